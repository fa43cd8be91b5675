"""quality.py: the sparse twin is exact when nothing is masked, the ReLU oracle is lossless, metrics by hand."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flashlib import quality as q
from flashlib import sparsity as sp
from flashlib.config import MaskRule
from flashlib.models import ffn_adapter
from tiny_models import tiny_llama, tiny_opt


def batches(n=64, seed=0):
    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))
    return sp.token_batches(ids.numpy(), seq_len=16, batch_size=2)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama], ids=["opt", "llama"])
def test_twin_without_masker_is_the_dense_model(make):
    model = make()
    twin = q.SparseTwin(model, ffn_adapter(model))
    ids = batches()[0]
    with torch.no_grad():
        dense, sparse = model(input_ids=ids).logits, twin.model(input_ids=ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    # weights are shared, not copied, and the original keeps its own FFN modules
    assert twin.model.lm_head.weight is model.lm_head.weight
    assert not any(isinstance(m, q.MaskedFFN) for m in model.modules())
    assert sum(isinstance(m, q.MaskedFFN) for m in twin.model.modules()) == 2


def test_relu_oracle_is_lossless_and_keeps_true_density():
    model = tiny_opt()
    adapter = ffn_adapter(model)
    twin = q.SparseTwin(model, adapter)
    b = batches()
    df = q.compare_to_dense(model, twin, {"oracle": q.oracle_masker(adapter, MaskRule())}, b,
                            progress=False).set_index("method")
    assert df.ppl["oracle"] == pytest.approx(df.ppl["dense"], rel=1e-5)
    assert df.agreement["oracle"] == 1.0
    true_density = sp.layer_sparsity(sp.record_masks(model, adapter, b, progress=False)).active_fraction.mean()
    assert df.kept_share["oracle"] == pytest.approx(true_density)


def test_masking_everything_leaves_the_output_bias():
    model = tiny_opt()
    twin = q.SparseTwin(model, ffn_adapter(model))
    twin.set_masker(lambda layer, x, act: torch.zeros_like(act, dtype=torch.bool))
    reference = tiny_opt()
    for layer in reference.model.decoder.layers:
        layer.fc2.weight.data.zero_()                   # FFN output = fc2.bias only
    ids = batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(twin.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert twin.kept_share() == 0.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(nn.Module):
        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 50))
    assert q.perplexity(Uniform(), [torch.zeros(2, 8, dtype=torch.long)], progress=False) == pytest.approx(50)


def test_topk_oracle_on_gated_model_keeps_the_asked_share():
    model = tiny_llama()
    adapter = ffn_adapter(model)
    twin = q.SparseTwin(model, adapter)
    maskers = {"half": q.oracle_masker(adapter, MaskRule(kind="topk", density=0.5)),
               "all": q.oracle_masker(adapter, MaskRule(kind="topk", density=1.0))}
    df = q.compare_to_dense(model, twin, maskers, batches(), progress=False).set_index("method")
    assert df.kept_share["half"] == pytest.approx(0.5)
    assert df.ppl["all"] == pytest.approx(df.ppl["dense"], rel=1e-5) and df.agreement["all"] == 1.0
    assert 0 < df.agreement["half"] <= 1 and math.isfinite(df.ppl["half"])


def test_density_sweep_and_lowest_density_within():
    model = tiny_llama()
    adapter = ffn_adapter(model)
    sweep = q.density_sweep(model, adapter, batches(32), (0.5, 1.0), MaskRule(kind="topk"), progress=False)
    assert list(sweep.method) == ["dense", "oracle", "oracle"] and list(sweep.density) == [1.0, 0.5, 1.0]
    assert sweep.ppl_ratio.iloc[2] == pytest.approx(1.0, rel=1e-5)
    import pandas as pd
    hand = pd.DataFrame({"method": ["oracle"] * 3 + ["predicted"], "density": [0.3, 0.5, 0.7, 0.7],
                         "ppl_ratio": [1.20, 1.04, 1.01, 1.10]})
    assert q.lowest_density_within(hand, "oracle", 0.05) == 0.5
    assert math.isnan(q.lowest_density_within(hand, "predicted", 0.05))
    two = pd.concat([hand.assign(domain="a"), hand.assign(domain="b", ppl_ratio=[1.2, 1.06, 1.03, 1.0])])
    assert q.lowest_density_within(two, "oracle", 0.05) == 0.7           # the worst domain decides
