"""Low-rank activation predictors (paper sec 3.1 "Selective persistence / low-rank predictor", Fig 3, App. B).

One small predictor per layer reads the FFN input x (the layer's post-attention, normalised
hidden state: the paper's "current layer's attention output") and outputs one logit per FFN
neuron: ``logits = B(A x) + b`` with A ``[rank, d_model]`` and B ``[d_ffn, rank]``. A neuron is
predicted active when its logit exceeds the layer's threshold (or, for gated FFNs, when it is
in the per-token top-k of the logits: density is then a knob).

Training follows the paper where it says something and fills the gaps explicitly:
* labels: the ``MaskRule`` active mask (ReLU: act != 0; gated: top-k on the contribution);
* data: FFN inputs recorded once per layer from the training split (``collect_ffn_inputs``);
* loss: BCE-with-logits balanced per layer (``pos_weight`` = negatives / positives); for
  per-token top-k labels the logits are centred per token first (``cfg.per_token``);
* start: random, or (ReLU) the data-aware low-rank factors of the up projection
  (``init_from_up``), a training-free predictor that also competes as "epoch 0";
* checkpoint (epoch) selection: recall at a fixed predicted density (``select_ratio`` x the
  true density), not recall alone, which favours dense predictors;
* threshold: calibrated on held-back tokens (target recall, target density, or the paper's
  fixed sigmoid 0.5).

Beyond the paper, for gated FFNs: ``GateResidentPredictor`` keeps the exact gate resident and
predicts only up.x in low rank (``kind="gate"``).

Predictors are saved with the model they belong to (name, layer count, widths, ranks); loading a
file against a different model is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import paths
from .config import MaskRule, PredictorConfig, smoke_mode
from .sparsity import active_mask, down_norms, run_with_ffn_inputs, topk_mask

# --- ranks ------------------------------------------------------------------------------


def layer_ranks(cfg: PredictorConfig, n_layers: int, d_model: int) -> list[int]:
    """Per-layer ranks: the paper's "larger ranks for the last (sensitive) layers", scaled to d_model.

    The last ``ceil(sensitive_layer_fraction * n_layers)`` layers get
    ``sensitive_rank_fraction * d_model``, the others ``rank_fraction * d_model``; both are
    rounded up to ``rank_multiple`` and capped at d_model. Paper OPT 6.7B (32 layers, 4096):
    28 x 128 and 4 x 1024.
    """
    n_sensitive = math.ceil(cfg.sensitive_layer_fraction * n_layers - 1e-9)

    def rank(fraction: float) -> int:
        r = math.ceil(fraction * d_model / cfg.rank_multiple) * cfg.rank_multiple
        return max(cfg.rank_multiple, min(r, d_model))

    return [rank(cfg.sensitive_rank_fraction if l >= n_layers - n_sensitive else cfg.rank_fraction)
            for l in range(n_layers)]


# --- modules ----------------------------------------------------------------------------


class LowRankPredictor(nn.Module):
    """One layer's predictor: x ``[..., d_model]`` -> logits ``[..., d_ffn]`` through rank r."""

    def __init__(self, d_model: int, rank: int, d_ffn: int, hidden_act: str = "none"):
        super().__init__()
        if hidden_act not in ("none", "relu"):
            raise ValueError(f"hidden_act must be 'none' or 'relu', got {hidden_act!r}")
        self.down = nn.Linear(d_model, rank, bias=False)   # A [rank, d_model]
        self.up = nn.Linear(rank, d_ffn)                   # B [d_ffn, rank], bias [d_ffn]
        self.hidden_act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.down.weight)      # F.linear, not the submodules: per-token calls are tiny
        return F.linear(torch.relu(h) if self.hidden_act == "relu" else h, self.up.weight, self.up.bias)


class GateResidentPredictor(nn.Module):
    """Gated FFNs only (beyond the paper): the exact gate plus a low-rank estimate of up.x.

    logit_i = t * (log|silu(gate_i.x)| + log|u_i(x)|) + b_i, with u(x) a rank-r map: a sharpened
    log of the neuron's contribution |silu(gate_i.x) * (up_i.x)| * ||down_i||, where the learned
    b_i absorbs log ||down_i|| and the learned temperature t lets the loss sharpen the logits
    without bending u away from up.x (scaling u only shifts every logit). The
    gate matrix ``[d_ffn, d_model]`` is the model's own (bound, never saved), so it must stay
    resident in DRAM: 1/3 of the FFN, like the paper's "gate as exact predictor" option for
    Llama 2 (App. B), while up and down are still loaded per neuron.
    """

    EPS = 1e-4

    def __init__(self, d_model: int, rank: int, d_ffn: int, gate: torch.Tensor, act=F.silu):
        super().__init__()
        self.up_estimate = LowRankPredictor(d_model, rank, d_ffn)
        self.bias = nn.Parameter(torch.zeros(d_ffn))
        self.temperature = nn.Parameter(torch.ones(()))
        self.gate = gate.detach()          # [d_ffn, d_model], shared with the model, not a parameter
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.act(F.linear(x, self.gate)).abs()
        log_score = torch.log(g + self.EPS) + torch.log(self.up_estimate(x).abs() + self.EPS)
        return self.temperature * log_score + self.bias


def low_rank_factors(weight: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[rank, d_model]``, B ``[d_ffn, rank]`` minimising E||W x - B A x||^2 over the inputs x ``[n, d_model]``.

    Whitened SVD: with C = E[x x^T], W C^1/2 = U S V^T gives A = V_r^T C^-1/2 and B = U_r S_r,
    the best rank-r map in the data's own norm (a training-free predictor of W x).
    """
    xf = x.float()
    cov = xf.T @ xf / xf.shape[0] + 1e-6 * torch.eye(xf.shape[1])
    e, v = torch.linalg.eigh(cov)
    e = e.clamp(min=1e-8)
    u, sv, vh = torch.linalg.svd(weight.detach().float() @ (v * e.sqrt()) @ v.T, full_matrices=False)
    return vh[:rank] @ (v / e.sqrt()) @ v.T, u[:, :rank] * sv[:rank]


def init_from_up(net: nn.Module, up: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> None:
    """Start a predictor from the data-aware low-rank factors of the up projection.

    ``LowRankPredictor`` (ReLU FFNs): logits = low-rank (up.x + b), whose sign is the label.
    ``GateResidentPredictor``: its up.x estimate. Training then only has to refine.
    """
    target = net.up_estimate if isinstance(net, GateResidentPredictor) else net
    a, b = low_rank_factors(up, x, target.down.weight.shape[0])
    with torch.no_grad():
        target.down.weight.copy_(a)
        target.up.weight.copy_(b)
        target.up.bias.copy_(bias.detach() if bias is not None else torch.zeros(b.shape[0]))


def make_layer_predictor(kind: str, d_model: int, rank: int, d_ffn: int, hidden_act: str = "none",
                         gate: torch.Tensor | None = None) -> nn.Module:
    """A ``LowRankPredictor`` (kind "lowrank", the paper's) or a ``GateResidentPredictor`` ("gate")."""
    if kind == "lowrank":
        return LowRankPredictor(d_model, rank, d_ffn, hidden_act)
    if kind == "gate":
        if gate is None:
            raise ValueError("predictor kind 'gate' needs the model's gate weights (a gated FFN adapter)")
        return GateResidentPredictor(d_model, rank, d_ffn, gate)
    raise ValueError(f"predictor kind must be 'lowrank' or 'gate', got {kind!r}")


@dataclass
class PredictorMeta:
    """What a predictor file belongs to; checked against the model on load."""

    model_name: str
    family: str
    n_layers: int
    d_model: int
    d_ffn: int
    ranks: dict[int, int]                 # layer -> rank (layers without a predictor stay dense)
    hidden_act: str = "none"
    kind: str = "lowrank"                 # "lowrank" (paper) or "gate" (GateResidentPredictor)
    label_rule: MaskRule = field(default_factory=MaskRule)
    thresholds: dict[int, float] = field(default_factory=dict)   # layer -> logit threshold
    provenance: dict = field(default_factory=dict)     # training config, token counts, wall times

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["ranks"] = {str(k): v for k, v in self.ranks.items()}
        d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> PredictorMeta:
        d = json.loads(text)
        d["ranks"] = {int(k): v for k, v in d["ranks"].items()}
        d["thresholds"] = {int(k): v for k, v in d["thresholds"].items()}
        d["label_rule"] = MaskRule(**d["label_rule"])
        return cls(**d)


class Predictors(nn.Module):
    """The predictors of one model, with their thresholds: ``mask(layer, x)`` is the predicted active set."""

    def __init__(self, meta: PredictorMeta, gates: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.meta = meta
        gates = gates or {}
        self.nets = nn.ModuleDict({str(l): make_layer_predictor(meta.kind, meta.d_model, r, meta.d_ffn,
                                                                meta.hidden_act, gates.get(l))
                                   for l, r in sorted(meta.ranks.items())})

    @property
    def layers(self) -> list[int]:
        return sorted(self.meta.ranks)

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_ffn]`` logits of one layer (float32), computed in the predictors' dtype."""
        net = self.nets[str(layer)]
        return net(x.to(next(net.parameters()).dtype)).float()

    def mask(self, layer: int, x: torch.Tensor, density: float | None = None) -> torch.Tensor:
        """Predicted active neurons ``[..., d_ffn]``: logit > threshold, or per-token top-k at ``density``."""
        z = self.logits(layer, x)
        if density is not None:
            return topk_mask(z, density)
        return z > self.meta.thresholds.get(layer, 0.0)

    def n_params(self) -> int:
        """Trained parameters (saved in the file)."""
        return sum(p.numel() for p in self.parameters())

    def resident_params(self) -> int:
        """Values that must sit in DRAM to predict: trained parameters plus any bound gate matrices."""
        return self.n_params() + sum(n.gate.numel() for n in self.nets.values() if hasattr(n, "gate"))

    def with_probability(self, p: float) -> Predictors:
        """The same predictors (shared weights) with every threshold at sigmoid probability ``p``."""
        meta = dataclasses.replace(self.meta, thresholds={l: math.log(p / (1 - p)) for l in self.layers})
        twin = Predictors.__new__(Predictors)
        nn.Module.__init__(twin)
        twin.meta, twin.nets = meta, self.nets
        return twin.eval()


# --- save / load ------------------------------------------------------------------------


class PredictorMismatch(ValueError):
    """A predictor file does not belong to the model it is loaded for."""


def predictor_path(model_name: str, tag: str = "", smoke: bool | None = None) -> Path:
    """Default file of a model's predictors: ``data/predictors/``, or ``build/smoke/`` in smoke mode."""
    smoke = smoke_mode() if smoke is None else smoke
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    root = paths.BUILD / "smoke" / "predictors" if smoke else paths.data_dir() / "predictors"
    return root / f"{slug}{'-' + tag if tag else ''}.safetensors"


def save_predictors(predictors: Predictors, path: Path) -> Path:
    """Write weights and metadata (model name, layer count, widths, ranks, thresholds) as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in predictors.state_dict().items()}
    save_file(tensors, str(path), metadata={"flashlib_predictors": predictors.meta.to_json()})
    return path


def check_matches(meta: PredictorMeta, adapter, model_name: str | None, source: str) -> None:
    """Refuse predictors made for another model: wrong layer count, widths or name."""
    problems = [f"{name} {got} != model's {want}" for name, got, want in (
        ("n_layers", meta.n_layers, adapter.n_layers), ("d_model", meta.d_model, adapter.d_model),
        ("d_ffn", meta.d_ffn, adapter.d_ffn), ("family", meta.family, adapter.family))
        if got != want]
    if model_name is not None and meta.model_name != model_name:
        problems.append(f"model_name {meta.model_name!r} != {model_name!r}")
    if any(l >= adapter.n_layers for l in meta.ranks):
        problems.append(f"predictor layers {sorted(meta.ranks)} exceed the model's {adapter.n_layers}")
    if problems:
        raise PredictorMismatch(f"predictor file {source} does not match this model: "
                                + "; ".join(problems) + ". Retrain with predictor.train_predictors "
                                "or load the file that belongs to this model.")


def model_gates(adapter, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """The model's gate matrices ``{layer: [d_ffn, d_model]}`` (shared, not copied) for "gate" predictors."""
    if not adapter.gated:
        raise ValueError(f"predictor kind 'gate' needs a gated FFN; this model's family is {adapter.family!r}")
    return {l: adapter.neuron_vectors(l)["gate"].detach() for l in layers}


def load_predictors(path: Path, adapter=None, model_name: str | None = None) -> Predictors:
    """Read a predictor file; with ``adapter`` (and ``model_name``), refuse one made for another model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no predictor file at {path}; train one with predictor.train_predictors")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get("flashlib_predictors")
    if header is None:
        raise PredictorMismatch(f"{path} is not a flashlib predictor file (no 'flashlib_predictors' metadata)")
    meta = PredictorMeta.from_json(header)
    if adapter is not None:
        check_matches(meta, adapter, model_name, str(path))
    elif meta.kind == "gate":
        raise ValueError(f"{path} holds gate-resident predictors: pass the model's adapter to bind its gates")
    predictors = Predictors(meta, model_gates(adapter, meta.ranks) if meta.kind == "gate" else None)
    predictors.load_state_dict(load_file(str(path)))
    return predictors.eval()


# --- training data ----------------------------------------------------------------------


def collect_ffn_inputs(model, adapter, batches: list[torch.Tensor], layers: Iterable[int] | None = None,
                       dtype: torch.dtype = torch.float16, progress: bool = True) -> dict[int, torch.Tensor]:
    """Record every listed layer's FFN input over ``batches``: ``{layer: [n_tokens, d_model]}`` in ``dtype``.

    One forward pass serves every layer; labels are recomputed from x per layer when needed
    (``layer_labels``), so only d_model values per token and layer are kept.
    """
    layers = list(range(adapter.n_layers) if layers is None else layers)
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}

    def keep(layer: int, x: torch.Tensor, shape: torch.Size) -> None:
        chunks[layer].append(x.reshape(-1, x.shape[-1]).to(dtype))

    run_with_ffn_inputs(model, adapter, batches, layers, keep, progress, desc="record FFN inputs")
    return {l: torch.cat(c) for l, c in chunks.items()}


def layer_labels(adapter, layer: int, x: torch.Tensor, rule: MaskRule, chunk: int = 4096) -> torch.Tensor:
    """True active mask ``[n_tokens, d_ffn]`` of one layer for recorded inputs x ``[n_tokens, d_model]``."""
    norm = down_norms(adapter, layer) if rule.weight_by_down_norm else None
    with torch.no_grad():
        return torch.cat([active_mask(adapter.activation(layer, part.float()), rule, norm)
                          for part in x.split(chunk)])


# --- metrics ----------------------------------------------------------------------------


def confusion_counts(pred: torch.Tensor, true: torch.Tensor) -> dict[str, int]:
    """TP, FP, FN, TN over all (token, neuron) pairs of two bool masks of equal shape."""
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": pred.numel() - tp - fp - fn}


def classification_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Recall, precision, false-negative rate FN/(TP+FN), false-positive rate FP/(FP+TN),
    predicted and true density (share of neurons), and their ratio (paper App. B.1: ~3x)."""
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    total = tp + fp + fn + tn

    def div(a, b):
        return a / b if b else float("nan")

    pred_density, true_density = div(tp + fp, total), div(tp + fn, total)
    return {"recall": div(tp, tp + fn), "precision": div(tp, tp + fp), "fn_rate": div(fn, tp + fn),
            "fp_rate": div(fp, fp + tn), "predicted_density": pred_density,
            "true_density": true_density, "ratio": div(pred_density, true_density)}


def threshold_at_share(values: torch.Tensor, share: float) -> float:
    """A threshold t with ``mean(values > t) ~= share`` (share of entries above it)."""
    v = values.reshape(-1).float()
    n_above = int(round(share * v.numel()))
    if n_above <= 0:
        return float(v.max())
    if n_above >= v.numel():
        return float(v.min()) - 1.0
    return float(v.kthvalue(v.numel() - n_above).values)


def recall_at_density(logits: torch.Tensor, labels: torch.Tensor, density: float,
                      per_token: bool = False) -> float:
    """Recall when ``density`` of the neurons are predicted: by one layer-wide threshold, or
    (``per_token``) by each token's top-k logits."""
    pred = topk_mask(logits, density) if per_token else logits > threshold_at_share(logits, density)
    return classification_metrics(confusion_counts(pred, labels))["recall"]


def calibrate_threshold(logits: torch.Tensor, labels: torch.Tensor, cfg: PredictorConfig) -> float:
    """Logit threshold of one layer from held-back logits and labels, by ``cfg.threshold_mode``."""
    if cfg.threshold_mode == "prob":
        return math.log(cfg.threshold / (1 - cfg.threshold))
    if cfg.threshold_mode == "recall":
        # largest t that keeps target_recall of the positives above it
        return threshold_at_share(logits[labels], cfg.target_recall)
    if cfg.threshold_mode == "density":
        return threshold_at_share(logits, min(1.0, cfg.target_ratio * labels.float().mean().item()))
    raise ValueError(f"threshold_mode must be 'prob', 'recall' or 'density', got {cfg.threshold_mode!r}")


# --- training ---------------------------------------------------------------------------


def _logits_in_chunks(net: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(part.float()) for part in x.split(chunk)])


def train_layer(x: torch.Tensor, labels: torch.Tensor, rank: int, cfg: PredictorConfig,
                progress: bool = True, desc: str = "layer", gate: torch.Tensor | None = None,
                up: torch.Tensor | None = None, up_bias: torch.Tensor | None = None
                ) -> tuple[nn.Module, float, pd.DataFrame]:
    """Train one layer's predictor on recorded inputs x ``[n, d_model]`` and labels ``[n, d_ffn]``.

    A random ``val_share`` of the tokens is held back: after every epoch the predictor's
    recall at predicted density ``select_ratio`` x true density (at most halfway from the
    true density to 1, so dense layers still discriminate) is measured there, and the best
    epoch is kept (epoch 0 = the ``init_from_up`` start, when used). Returns the predictor,
    its calibrated logit threshold and the per-epoch history (epoch | loss | recall_at_density
    | selected).

    With ``cfg.svd_init`` and the layer's ``up`` matrix (and bias), training starts from
    ``init_from_up``. ``cfg.per_token`` is for per-token top-k labels (gated FFNs): the loss sees each token's
    logits centred on their mean, so the predictor spends no capacity on a token's overall
    level (top-k ignores it), and epochs are compared by per-token top-k recall.
    """
    n = x.shape[0]
    n_val = max(1, int(round(cfg.val_share * n)))
    if n - n_val < 1:
        raise ValueError(f"need more than {n_val} recorded tokens to train (got {n})")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)           # held-back tokens drawn from every domain
    x_tr, y_tr = x[order[n_val:]], labels[order[n_val:]]
    x_va, y_va = x[order[:n_val]], labels[order[:n_val]]
    torch.manual_seed(cfg.seed)
    net = make_layer_predictor(cfg.kind, x.shape[1], rank, labels.shape[1], cfg.hidden_act, gate)
    if cfg.svd_init and up is not None:
        init_from_up(net, up, up_bias, x_tr[: cfg.svd_init_tokens])
    pos = y_tr.float().mean().clamp(1e-6, 1 - 1e-6)
    pos_weight = (1 - pos) / pos                       # balanced: both classes weigh the same
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(x_tr.shape[0] / cfg.train_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps),
                                                pct_start=0.1)
    p_true = y_va.float().mean().item()
    density = min(cfg.select_ratio * p_true, (1 + p_true) / 2)   # dense layers: stay below 100%
    history, best = [], (-1.0, None, 0)

    def select(epoch: int, loss: float) -> None:
        nonlocal best
        net.eval()
        score = recall_at_density(_logits_in_chunks(net, x_va), y_va, density, cfg.per_token)
        score = 0.0 if math.isnan(score) else score          # no positives held back
        history.append({"epoch": epoch, "loss": loss, "recall_at_density": score})
        if score >= best[0]:                                  # ties: the later, better-fit epoch
            best = (score, {k: v.clone() for k, v in net.state_dict().items()}, epoch)

    if cfg.svd_init and up is not None:
        select(0, float("nan"))                               # the training-free start competes too
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="step", leave=False)
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        total = 0.0
        for idx in torch.randperm(x_tr.shape[0], generator=gen).split(cfg.train_batch):
            z = net(x_tr[idx].float())
            if cfg.per_token:          # top-k labels: only a token's ranking matters, not its level
                z = z - z.mean(dim=-1, keepdim=True)
            loss = F.binary_cross_entropy_with_logits(z, y_tr[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
            bar.update(1)
        select(epoch, total / x_tr.shape[0])
    bar.close()
    net.load_state_dict(best[1])
    net.eval()
    threshold = calibrate_threshold(_logits_in_chunks(net, x_va), y_va, cfg)
    hist = pd.DataFrame(history)
    hist["selected"] = hist["epoch"] == best[2]
    return net, threshold, hist


def _init_weights(adapter, layer: int, cfg: PredictorConfig) -> dict:
    """The up matrix (and bias) ``init_from_up`` starts from, where it is a meaningful start:
    ReLU FFNs (logit = low-rank pre-activation) and gate-resident predictors (up.x estimate)."""
    if not cfg.svd_init or (adapter.gated and cfg.kind != "gate"):
        return {}
    return {"up": adapter.neuron_vectors(layer)["up"].detach(), "up_bias": adapter.neuron_bias(layer)}


def train_predictors(adapter, inputs: dict[int, torch.Tensor], model_name: str, cfg: PredictorConfig,
                     rule: MaskRule, progress: bool = True) -> tuple[Predictors, pd.DataFrame]:
    """Train one predictor per recorded layer (CPU); returns the predictors and a tidy history.

    ``inputs`` comes from ``collect_ffn_inputs`` on the training split. History columns:
    layer | rank | epoch | loss | recall_at_density | selected | seconds.
    """
    ranks_all = layer_ranks(cfg, adapter.n_layers, adapter.d_model)
    meta = PredictorMeta(model_name=model_name, family=adapter.family, n_layers=adapter.n_layers,
                         d_model=adapter.d_model, d_ffn=adapter.d_ffn,
                         ranks={l: ranks_all[l] for l in sorted(inputs)}, hidden_act=cfg.hidden_act,
                         kind=cfg.kind, label_rule=rule)
    gates = model_gates(adapter, meta.ranks) if cfg.kind == "gate" else {}
    predictors = Predictors(meta, gates)
    frames = []
    for layer in tqdm(sorted(inputs), desc="train predictors", disable=not progress, unit="layer"):
        t0 = time.perf_counter()
        labels = layer_labels(adapter, layer, inputs[layer], rule)
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.train_threads)
        try:
            net, threshold, hist = train_layer(inputs[layer], labels, meta.ranks[layer], cfg, progress,
                                               desc=f"layer {layer}", gate=gates.get(layer),
                                               **_init_weights(adapter, layer, cfg))
        finally:
            torch.set_num_threads(threads)
        predictors.nets[str(layer)].load_state_dict(net.state_dict())
        meta.thresholds[layer] = threshold
        frames.append(hist.assign(layer=layer, rank=meta.ranks[layer],
                                  seconds=time.perf_counter() - t0))
    return predictors.eval(), pd.concat(frames, ignore_index=True)


# --- held-out evaluation ----------------------------------------------------------------


def evaluate_predictors(predictors: Predictors, adapter, inputs: dict[int, torch.Tensor],
                        rule: MaskRule | None = None, density: float | None = None) -> pd.DataFrame:
    """Per-layer held-out metrics of the predicted masks against the true ones.

    ``inputs`` are FFN inputs recorded on held-out text (``collect_ffn_inputs``). Columns:
    layer | rank | recall | precision | fn_rate | fp_rate | predicted_density | true_density | ratio.
    ``density`` switches from the thresholds to a per-token top-k of the logits.
    """
    rule = rule or predictors.meta.label_rule
    rows = []
    for layer in predictors.layers:
        if layer not in inputs:
            continue
        labels = layer_labels(adapter, layer, inputs[layer], rule)
        with torch.no_grad():
            pred = torch.cat([predictors.mask(layer, part, density) for part in inputs[layer].split(4096)])
        rows.append({"layer": layer, "rank": predictors.meta.ranks[layer],
                     **classification_metrics(confusion_counts(pred, labels))})
    return pd.DataFrame(rows)


def threshold_sweep(predictors: Predictors, adapter, inputs: dict[int, torch.Tensor],
                    probabilities: Iterable[float], rule: MaskRule | None = None) -> pd.DataFrame:
    """Metrics per layer at several sigmoid thresholds (Table 4's threshold column): layer | threshold | ...."""
    rule = rule or predictors.meta.label_rule
    rows = []
    for layer in predictors.layers:
        labels = layer_labels(adapter, layer, inputs[layer], rule)
        z = _logits_in_chunks(predictors.nets[str(layer)], inputs[layer])
        for p in probabilities:
            rows.append({"layer": layer, "threshold": p,
                         **classification_metrics(confusion_counts(z > math.log(p / (1 - p)), labels))})
    return pd.DataFrame(rows)


# --- the whole recipe: record, train, save (cached) -------------------------------------


def fit_predictors(model_name: str, model, tokenizer, cfg: PredictorConfig, rule: MaskRule,
                   layers: Iterable[int] | None = None, path: Path | None = None, retrain: bool = False,
                   progress: bool = True) -> tuple[Predictors, pd.DataFrame]:
    """Predictors for ``model``: loaded from ``path`` when it was trained with the same config,
    rule and layers, else recorded on the training split, trained, and saved (with its history).

    Returns the predictors and the training history (``train_predictors``); wall and CPU
    times of the recording and of the training are in ``predictors.meta.provenance`` (CPU time
    is the fair measure on a shared machine).
    """
    from .models import ffn_adapter
    from .sparsity import domain_batches, fit_seq_len
    adapter = ffn_adapter(model)
    layers = sorted(range(adapter.n_layers) if layers is None else layers)
    path = Path(path or predictor_path(model_name))
    wanted = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "layers": layers}
    if path.exists() and not retrain:
        try:
            old = load_predictors(path, adapter, model_name)
        except PredictorMismatch as e:
            warnings.warn(f"retraining: {e}", stacklevel=2)
        else:
            if {k: old.meta.provenance.get(k) for k in wanted} == wanted and old.meta.label_rule == rule:
                return old, pd.read_csv(path.with_suffix(".history.csv"))
    t0, c0 = time.perf_counter(), time.process_time()
    per_domain = cfg.train_tokens // len(cfg.domains)
    batches = [b for bs in domain_batches(tokenizer, cfg.domains, "train", fit_seq_len(model, cfg.seq_len),
                                          cfg.batch_size, per_domain).values() for b in bs]
    inputs = collect_ffn_inputs(model, adapter, batches, layers, progress=progress)
    t1, c1 = time.perf_counter(), time.process_time()
    predictors, history = train_predictors(adapter, inputs, model_name, cfg, rule, progress)
    predictors.meta.provenance = {**wanted, "train_tokens": int(inputs[layers[0]].shape[0]),
                                  "record_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1,
                                  "record_cpu_seconds": c1 - c0, "train_cpu_seconds": time.process_time() - c1,
                                  "torch_threads": torch.get_num_threads()}
    save_predictors(predictors, path)
    history.to_csv(path.with_suffix(".history.csv"), index=False)
    return predictors, history


def fig3_points(predictors: Predictors, adapter, layer: int, x: torch.Tensor,
                rule: MaskRule | None = None) -> pd.DataFrame:
    """Paper Fig 3a, one row per (token, neuron) of inputs x ``[n, d_model]``: the FFN's own
    pre-activation (non-gated: up_i.x + b_i, whose sign is ReLU's label; gated: act_i, the
    down_proj input), the predictor's logit, the true label and the prediction."""
    rule = rule or predictors.meta.label_rule
    with torch.no_grad():
        xf = x.float()
        if adapter.gated:
            pre = adapter.activation(layer, xf)
        else:
            bias = adapter.neuron_bias(layer)
            pre = xf @ adapter.neuron_vectors(layer)["up"].T + (0 if bias is None else bias)
        logits = predictors.logits(layer, xf)
    truth = layer_labels(adapter, layer, x, rule)
    pred = logits > predictors.meta.thresholds.get(layer, 0.0)
    return pd.DataFrame({"token": torch.arange(x.shape[0]).repeat_interleave(adapter.d_ffn).numpy(),
                         "preactivation": pre.reshape(-1).numpy(), "logit": logits.reshape(-1).numpy(),
                         "active": truth.reshape(-1).numpy(), "predicted": pred.reshape(-1).numpy()})
