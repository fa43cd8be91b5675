"""predictor.py: ranks, metrics on hand-worked examples, a known low-rank task, save/load refusal."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from flashlib import predictor as pr
from flashlib import sparsity as sp
from flashlib.config import PREDICTOR_PRESETS, MaskRule, PredictorConfig
from flashlib.models import ffn_adapter


def tiny_opt(n_layers=2, d_model=16, d_ffn=48, seed=0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=d_model, ffn_dim=d_ffn, num_hidden_layers=n_layers,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=d_model,
                    activation_function="relu")
    return OPTForCausalLM(cfg).eval()


# --- ranks ------------------------------------------------------------------------------

def test_paper_ranks_for_opt67b():
    ranks = pr.layer_ranks(PREDICTOR_PRESETS["paper-opt67b"], n_layers=32, d_model=4096)
    assert ranks == [128] * 28 + [1024] * 4
    assert sum(ranks) / 32 == 240                       # paper App. B: mean rank 240


def test_proportional_ranks_small_model():
    cfg = PredictorConfig(rank_fraction=1 / 8, sensitive_rank_fraction=1 / 4, rank_multiple=8)
    assert pr.layer_ranks(cfg, n_layers=4, d_model=256) == [32, 32, 32, 64]     # ceil(4/8) = 1 sensitive
    assert pr.layer_ranks(cfg, n_layers=30, d_model=576)[-5:] == [72, 144, 144, 144, 144]


# --- metrics on hand-worked examples ------------------------------------------------------

def test_classification_metrics_hand_worked():
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    true = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    counts = pr.confusion_counts(pred, true)
    assert counts == {"tp": 2, "fp": 1, "fn": 1, "tn": 4}
    m = pr.classification_metrics(counts)
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 3)
    assert m["fn_rate"] == pytest.approx(1 / 3) and m["fp_rate"] == pytest.approx(1 / 5)
    assert m["predicted_density"] == pytest.approx(3 / 8) and m["true_density"] == pytest.approx(3 / 8)
    assert m["ratio"] == pytest.approx(1.0)


def test_paper_like_operating_point():
    # 100 neurons, 3 truly active, predictor flags 10 including 2.85 of 3 on average -> paper's 5% FN, ~3x
    m = pr.classification_metrics({"tp": 57, "fp": 143, "fn": 3, "tn": 1797})
    assert m["fn_rate"] == pytest.approx(0.05) and m["ratio"] == pytest.approx(200 / 60)
    assert m["fp_rate"] == pytest.approx(143 / 1940)          # ~7%, paper App. C.1


def test_thresholds_hit_their_targets():
    logits = torch.arange(10, dtype=torch.float32)               # 0..9
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    assert (logits > pr.threshold_at_share(logits, 0.3)).sum() == 3
    assert pr.recall_at_density(logits, labels, 0.2) == pytest.approx(0.5)
    cfg = PredictorConfig(threshold_mode="recall", target_recall=0.75)
    t = pr.calibrate_threshold(logits, labels, cfg)
    assert (logits[labels] > t).float().mean() == pytest.approx(0.75)
    cfg = dataclasses.replace(cfg, threshold_mode="density", target_ratio=2.0)
    assert (logits > pr.calibrate_threshold(logits, labels, cfg)).float().mean() == pytest.approx(0.8)
    cfg = dataclasses.replace(cfg, threshold_mode="prob", threshold=0.5)
    assert pr.calibrate_threshold(logits, labels, cfg) == 0.0


# --- a task with known low-rank structure ---------------------------------------------------

def test_learns_a_rank_4_task_near_perfectly():
    g = torch.Generator().manual_seed(1)
    d_model, d_ffn, rank = 32, 64, 4
    w = torch.randn(d_ffn, rank, generator=g) @ torch.randn(rank, d_model, generator=g) / rank ** 0.5
    bias = torch.full((d_ffn,), -1.5)

    def labels(x):
        return x @ w.T + bias > 0                                # "ReLU active" of a rank-4 up-projection

    x, x_test = torch.randn(4000, d_model, generator=g), torch.randn(2000, d_model, generator=g)
    cfg = PredictorConfig(epochs=8, train_batch=128, lr=3e-2, val_share=0.2, threshold_mode="recall",
                          target_recall=0.99, select_ratio=1.5)
    net, threshold, hist = pr.train_layer(x, labels(x), rank, cfg, progress=False)
    assert hist.selected.sum() == 1 and hist.recall_at_density.iloc[-1] > hist.recall_at_density.iloc[0]
    with torch.no_grad():
        m = pr.classification_metrics(pr.confusion_counts(net(x_test) > threshold, labels(x_test)))
    assert m["recall"] > 0.97 and m["precision"] > 0.9 and m["ratio"] < 1.1


# --- end to end on a tiny model, save / load ----------------------------------------------

@pytest.fixture(scope="module")
def trained():
    model = tiny_opt()
    adapter = ffn_adapter(model)
    tokens = torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0)).numpy()
    cfg = PREDICTOR_PRESETS["smoke"]
    inputs = pr.collect_ffn_inputs(model, adapter, sp.token_batches(tokens[:1024], 32, 4), progress=False)
    preds, hist = pr.train_predictors(adapter, inputs, "tiny-opt", cfg, MaskRule(), progress=False)
    return model, adapter, tokens, preds, hist


def test_train_and_evaluate_tiny_opt(trained):
    model, adapter, tokens, preds, hist = trained
    assert preds.layers == [0, 1] and set(hist.layer) == {0, 1}
    held = pr.collect_ffn_inputs(model, adapter, sp.token_batches(tokens[1024:], 32, 4), progress=False)
    assert held[0].shape == (1024, 16) and held[0].dtype == torch.float16
    df = pr.evaluate_predictors(preds, adapter, held)
    assert list(df.layer) == [0, 1]
    assert ((df.recall >= 0) & (df.recall <= 1) & (df.predicted_density > 0)).all()
    assert df.ratio.tolist() == pytest.approx((df.predicted_density / df.true_density).tolist())
    topk = pr.evaluate_predictors(preds, adapter, held, density=0.25)
    assert topk.predicted_density.tolist() == pytest.approx([12 / 48, 12 / 48])


def test_save_load_round_trip(trained, tmp_path):
    model, adapter, tokens, preds, _ = trained
    path = pr.save_predictors(preds, tmp_path / "p.safetensors")
    again = pr.load_predictors(path, adapter, model_name="tiny-opt")
    x = torch.randn(5, 16)
    assert torch.equal(again.logits(1, x), preds.logits(1, x))
    assert again.meta.thresholds == preds.meta.thresholds and again.meta.ranks == preds.meta.ranks
    assert torch.equal(again.mask(0, x), preds.mask(0, x))


def test_mismatched_file_is_refused(trained, tmp_path):
    _, _, _, preds, _ = trained
    path = pr.save_predictors(preds, tmp_path / "p.safetensors")
    with pytest.raises(pr.PredictorMismatch, match="n_layers 2 != model's 3"):
        pr.load_predictors(path, ffn_adapter(tiny_opt(n_layers=3)))
    with pytest.raises(pr.PredictorMismatch, match="d_ffn 48 != model's 64"):
        pr.load_predictors(path, ffn_adapter(tiny_opt(d_ffn=64)))
    with pytest.raises(pr.PredictorMismatch, match="model_name"):
        pr.load_predictors(path, ffn_adapter(tiny_opt()), model_name="relu-opt")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(pr.PredictorMismatch, match="family"):
        pr.load_predictors(path, ffn_adapter(llama))
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        pr.load_predictors(tmp_path / "other.safetensors", ffn_adapter(tiny_opt()))
    with pytest.raises(FileNotFoundError, match="train one"):
        pr.load_predictors(tmp_path / "missing.safetensors")


def test_fig3_points_sign_of_preactivation_is_the_relu_label(trained):
    model, adapter, tokens, preds, _ = trained
    held = pr.collect_ffn_inputs(model, adapter, sp.token_batches(tokens[:64], 32, 2), layers=[1], progress=False)
    df = pr.fig3_points(preds, adapter, 1, held[1][:4])
    assert len(df) == 4 * 48
    assert ((df.preactivation > 0) == df.active).all()
    assert (df.predicted == (df.logit > preds.meta.thresholds[1])).all()


def test_with_probability_shares_weights(trained):
    preds = trained[3]
    half = preds.with_probability(0.5)
    assert half.nets is preds.nets and half.meta.thresholds == {0: 0.0, 1: 0.0}
    assert preds.meta.thresholds != half.meta.thresholds           # original untouched
    x = torch.randn(3, 16)
    assert torch.equal(half.mask(0, x), preds.logits(0, x) > 0)


def test_gate_resident_predictor_is_near_exact_when_up_is_low_rank(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    adapter = ffn_adapter(llama)
    with torch.no_grad():                                    # make up_proj exactly rank 2
        up = llama.model.layers[0].mlp.up_proj.weight
        up.copy_(torch.randn(48, 2) @ torch.randn(2, 16))
    x = torch.randn(3000, 16)
    rule = MaskRule(kind="topk", density=0.5, weight_by_down_norm=False)   # score = |silu(g) * u| exactly
    labels = pr.layer_labels(adapter, 0, x, rule)
    # the data-aware start reproduces up.x exactly (rank 2), so "epoch 0" must win the selection
    cfg = PredictorConfig(kind="gate", per_token=True, svd_init=True, epochs=1, train_batch=128,
                          select_ratio=1.4, threshold_mode="density", target_ratio=1.0)
    gate = pr.model_gates(adapter, [0])[0]
    net, _, hist = pr.train_layer(x[:2000], labels[:2000], 2, cfg, progress=False, gate=gate, up=up.detach())
    assert hist.epoch.tolist() == [0, 1] and hist.recall_at_density[0] > 0.99
    with torch.no_grad():
        pred = sp.topk_mask(net(x[2000:]), 0.5)
    assert pr.classification_metrics(pr.confusion_counts(pred, labels[2000:]))["recall"] > 0.97
    # saved without the gate; loading binds the model's own gate and refuses to load without it
    meta = pr.PredictorMeta("tiny-llama", "llama", 1, 16, 48, {0: 2}, kind="gate", label_rule=rule)
    preds = pr.Predictors(meta, {0: gate})
    preds.nets["0"].load_state_dict(net.state_dict())
    path = pr.save_predictors(preds, tmp_path / "g.safetensors")
    again = pr.load_predictors(path, adapter)
    assert again.nets["0"].gate is gate or torch.equal(again.nets["0"].gate, gate)
    assert torch.equal(again.logits(0, x[:5]), preds.logits(0, x[:5]))
    assert preds.resident_params() == preds.n_params() + 48 * 16
    with pytest.raises(ValueError, match="adapter"):
        pr.load_predictors(path)
    with pytest.raises(ValueError, match="gated FFN"):
        pr.model_gates(ffn_adapter(tiny_opt()), [0])


def test_low_rank_factors_are_exact_for_a_low_rank_map():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 3, generator=g) @ torch.randn(3, 12, generator=g)      # rank 3
    x = torch.randn(500, 12, generator=g) * torch.linspace(0.1, 3, 12)          # anisotropic inputs
    a, b = pr.low_rank_factors(w, x, 3)
    assert a.shape == (3, 12) and b.shape == (40, 3)
    torch.testing.assert_close(x @ a.T @ b.T, x @ w.T, rtol=1e-3, atol=1e-3)
    a1, b1 = pr.low_rank_factors(w, x, 1)                                        # best rank 1 in data norm
    err1 = ((x @ a1.T @ b1.T - x @ w.T) ** 2).mean()
    u, s_, vh = torch.linalg.svd(w)
    naive = ((x @ (u[:, :1] * s_[:1] @ vh[:1]).T - x @ w.T) ** 2).mean()       # plain SVD ignores x
    assert err1 <= naive + 1e-4
