"""Predictor robustness across text domains: metrics and load costs against hand-checked values."""
import numpy as np
import pandas as pd
import pytest
import torch

from flashlib import robustness as rb
from flashlib.config import CORPUS, ROBUSTNESS_PRESETS
from flashlib.models import ffn_adapter, load_model
from flashlib.predictor import PredictorMeta, Predictors


@pytest.fixture(scope="module")
def smoke():
    model, tok = load_model("relu-opt-smoke", progress=False)
    a = ffn_adapter(model)
    torch.manual_seed(0)
    x = torch.randn(2 * 8, a.d_model)                     # 2 "sequences" of 8 tokens, layer inputs
    return model, a, {0: x, 1: x * 0.5}


def exact_predictors(a, layers=(0, 1)) -> Predictors:
    """Full-rank 'predictors' whose logits are the FFN's own pre-activation: x @ up.T + b (threshold 0)."""
    meta = PredictorMeta("relu-opt-smoke", a.family, a.n_layers, a.d_model, a.d_ffn,
                         ranks={l: a.d_model for l in layers}, thresholds={l: 0.0 for l in layers})
    p = Predictors(meta)
    with torch.no_grad():
        for l in layers:
            p.nets[str(l)].down.weight.copy_(torch.eye(a.d_model))
            p.nets[str(l)].up.weight.copy_(a.neuron_vectors(l)["up"])
            p.nets[str(l)].up.bias.copy_(a.neuron_bias(l))
    return p.eval()


def test_window_new_share_hand_checked():
    # d_ffn 4; tokens: {0,1}, {1,2}, {3}, {3}
    seq = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=bool)[None]
    # k=1: new at t=1 {2}, t=2 {3}, t=3 {} -> (1 + 1 + 0) / 3 tokens / 4 neurons
    assert rb.window_new_share(seq, 1) == pytest.approx(2 / 3 / 4)
    # k=2: t=2 {3} (window {0,1,2}), t=3 {} -> 1 / 2 / 4
    assert rb.window_new_share(seq, 2) == pytest.approx(1 / 2 / 4)
    # the window of 2 holds {0,1,2}, {1,2,3}, {3} after tokens 1..3: (3 + 3 + 1) / 3 / 4
    assert rb.window_shares(seq, 2) == pytest.approx((1 / 2 / 4, 7 / 12))


def test_exact_predictor_has_perfect_recall_and_the_oracle_cost(smoke):
    model, a, inputs = smoke
    exact = exact_predictors(a)
    never = exact_predictors(a)
    never.meta.thresholds = {0: 1e9, 1: 1e9}               # predicts nothing
    tab = rb.classifier_table({"exact": exact, "never": never}, a, {"news": inputs, "code": inputs})
    e, n = tab[tab.predictor == "exact"], tab[tab.predictor == "never"]
    assert (e.recall == 1).all() and (e.fn_rate == 0).all() and (e.ratio == 1).all()
    assert np.allclose(e.predicted_density, e.true_density)
    assert (n.recall == 0).all() and (n.predicted_density == 0).all() and (n.fn_rate == 1).all()
    cost = rb.load_cost({"exact": exact}, a, {"news": inputs}, seq_len=8, k=2, dtype=torch.float32)
    by = cost.set_index(["predictor", "layer"])
    for l in (0, 1):                                        # a perfect predictor loads what the oracle loads
        assert by.loc[("exact", l), "density"] == pytest.approx(by.loc[("oracle", l), "density"])
        assert by.loc[("exact", l), "bytes_window"] == pytest.approx(by.loc[("oracle", l), "bytes_window"])
    # bytes = share x d_ffn x bundle bytes (up + down, fp32: 2 x 32 x 4 = 256 B)
    assert (cost.bundle_bytes == 256).all()
    row = by.loc[("oracle", 0)]
    true0 = rb.true_masks(a, 0, inputs[0]).float().mean().item()
    assert row["density"] == pytest.approx(true0)
    assert row["bytes_no_window"] == pytest.approx(true0 * a.d_ffn * 256)


def test_cost_per_token_sums_layers_and_compares_with_news():
    cost = pd.DataFrame({"predictor": ["p"] * 4, "domain": ["news", "news", "code", "code"], "layer": [0, 1, 0, 1],
                         "bytes_no_window": [1000, 3000, 3000, 5000], "bytes_window": [100, 100, 300, 300]})
    out = rb.cost_per_token(cost).set_index("domain")
    assert out.loc["news", "kb_no_window"] == 4 and out.loc["code", "kb_no_window"] == 8
    assert out.loc["code", "kb_no_window_vs_news"] == 2 and out.loc["code", "kb_window_vs_news"] == pytest.approx(3)


def test_summary_joins_metrics_quality_and_cost():
    cls = pd.DataFrame({"predictor": "p", "domain": ["news", "news"], "layer": [0, 1], "recall": [0.9, 0.7],
                        "fn_rate": [0.1, 0.3], "predicted_density": [0.2, 0.4], "true_density": [0.1, 0.1],
                        "ratio": [2.0, 4.0]})
    q = pd.DataFrame({"domain": "news", "method": ["dense", "p"], "ppl": [10.0, 11.0], "ppl_ratio": [1.0, 1.1],
                      "agreement": [1.0, 0.9]})
    cost = pd.DataFrame({"predictor": "p", "domain": "news", "layer": [0, 1], "bytes_no_window": [1e3, 1e3],
                         "bytes_window": [10, 30]})
    s = rb.summarize(cls, q, cost).iloc[0]
    assert s.recall == pytest.approx(0.8) and s.ratio == 3 and s.ppl_ratio == 1.1 and s.dense_ppl == 10
    assert s.kb_no_window == 2 and s.kb_window == pytest.approx(0.04)


def test_labels_and_presets():
    assert rb.label_of(("news",)) == "news-only" and rb.label_of(CORPUS.domains) == "mixed"
    assert rb.robustness_config("smollm2", smoke=False) is ROBUSTNESS_PRESETS["smollm2"]
    assert rb.robustness_config("relu-opt", smoke=True).max_tokens < ROBUSTNESS_PRESETS["relu-opt"].max_tokens
