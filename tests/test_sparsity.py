"""sparsity.py: active masks, s_agg(k) and closest friends against hand-worked answers; hooks on tiny models."""
import math

import numpy as np
import pytest
import torch

from flashlib import sparsity as sp
from flashlib.config import MaskRule
from flashlib.models import ffn_adapter
from tiny_models import tiny_llama, tiny_opt


# --- masks ------------------------------------------------------------------------------

def test_nonzero_mask_is_relu_exact_zeros():
    act = torch.tensor([[0.0, 1.5, 0.0, 2.0]])
    assert sp.active_mask(act, MaskRule()).tolist() == [[False, True, False, True]]


def test_threshold_uses_contribution_norm():
    act = torch.tensor([[1.0, -2.0, 0.5]])
    norms = torch.tensor([1.0, 0.25, 4.0])           # scores |act| * ||down||: 1, 0.5, 2
    rule = MaskRule(kind="threshold", threshold=0.9)
    assert sp.active_mask(act, rule, norms).tolist() == [[True, False, True]]
    plain = MaskRule(kind="threshold", threshold=0.9, weight_by_down_norm=False)   # 1, 2, 0.5
    assert sp.active_mask(act, plain).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="down_norm"):
        sp.active_mask(act, rule)


def test_topk_keeps_largest_contributions_per_token():
    act = torch.tensor([[3.0, -1.0, 0.2, -5.0], [0.1, 0.2, 0.3, 0.4]])
    rule = MaskRule(kind="topk", density=0.5, weight_by_down_norm=False)
    assert sp.active_mask(act, rule).tolist() == [[True, False, False, True], [False, False, True, True]]
    with pytest.raises(ValueError, match="density"):
        sp.topk_mask(act, 0.0)


# --- s_agg(k) on a scripted trace -------------------------------------------------------

def scripted_trace():
    """Sequence 0 (d=4): tokens activate {0}, {1}, {0}, {2}. Sequence 1: every neuron, every token."""
    seq0 = torch.zeros(4, 4, dtype=torch.bool)
    for t, i in enumerate([0, 1, 0, 2]):
        seq0[t, i] = True
    return torch.stack([seq0, torch.ones(4, 4, dtype=torch.bool)])


def test_aggregated_usage_hand_computed_one_sequence():
    df = sp.aggregated_usage(scripted_trace()[0], [1, 2, 3, 4]).set_index("k")
    # k=1: one neuron per token. k=2: unions {0,1},{0,1},{0,2}. k=3: {0,1},{0,1,2}. k=4: {0,1,2}
    assert df.s_agg.tolist() == pytest.approx([1 / 4, 2 / 4, 2.5 / 4, 3 / 4])
    # new at t vs the k tokens before: k=1: t=1,2,3 all new; k=2: t=2 reused, t=3 new; k=3: t=3 new
    assert df.new_per_token.tolist()[:3] == pytest.approx([1 / 4, 0.5 / 4, 1 / 4])
    assert math.isnan(df.new_per_token[4])
    assert df.peak_resident.tolist() == [1, 2, 3, 3]


def test_aggregated_usage_windows_do_not_cross_sequences():
    df = sp.aggregated_usage(scripted_trace(), [1, 2]).set_index("k")
    # sequence 1 uses every neuron always (s_agg 1, nothing new); the mean is over equal-length sequences
    assert df.s_agg.tolist() == pytest.approx([(0.25 + 1) / 2, (0.5 + 1) / 2])
    assert df.new_per_token.tolist() == pytest.approx([(0.25 + 0) / 2, (0.125 + 0) / 2])


# --- co-activation ----------------------------------------------------------------------

def test_closest_friend_shares_hand_computed():
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    counts = sp.coactivation_counts(mask, chunk=3)             # chunking must not change counts
    assert counts.tolist() == [[3, 2, 1], [2, 2, 0], [1, 0, 2]]
    shares, ids = sp.closest_friend_shares(counts)
    assert ids.tolist() == [0, 1, 2]
    assert shares.flatten().tolist() == pytest.approx([2 / 3, 1 / 3, 1.0, 0.0, 0.5, 0.0])
    shares, ids = sp.closest_friend_shares(counts, min_activations=3)
    assert ids.tolist() == [0]
    summary = sp.friend_summary(sp.closest_friend_shares(counts)[0], [1, 2]).set_index("friend")
    assert summary.mean_share[1] == pytest.approx((2 / 3 + 1 + 0.5) / 3)


# --- recording through the adapter ------------------------------------------------------

def test_token_batches_whole_sequences():
    batches = sp.token_batches(np.arange(100, dtype=np.uint16), seq_len=8, batch_size=3, max_tokens=40)
    assert [b.shape[0] for b in batches] == [3, 2] and all(b.shape[1] == 8 for b in batches)
    assert batches[1][-1].tolist() == list(range(32, 40))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        sp.token_batches(np.arange(5), seq_len=8, batch_size=1)


def test_record_masks_matches_fc1_relu_on_opt():
    model = tiny_opt()
    adapter = ffn_adapter(model)
    batches = sp.token_batches(torch.randint(0, 64, (96,)).numpy(), seq_len=16, batch_size=2)
    seen = []
    h = model.model.decoder.layers[1].fc1.register_forward_hook(lambda m, a, out: seen.append(out > 0))
    try:
        trace = sp.record_masks(model, adapter, batches, progress=False)
    finally:
        h.remove()
    assert trace.masks[1].shape == (6, 16, 48) and trace.n_tokens == 96
    assert torch.equal(trace.flat(1), torch.cat(seen).reshape(-1, 48))
    df = sp.layer_sparsity(trace)
    assert df.active_fraction[1] == pytest.approx(torch.cat(seen).float().mean().item())
    assert 0 < df.active_fraction[0] < 1


def test_record_masks_topk_density_on_gated_model():
    model = tiny_llama()
    adapter = ffn_adapter(model)
    assert sp.default_mask_rule(adapter).kind == "topk"
    batches = sp.token_batches(torch.randint(0, 64, (64,)).numpy(), seq_len=16, batch_size=4)
    rule = MaskRule(kind="topk", density=0.25)
    trace = sp.record_masks(model, adapter, batches, rule, layers=[1], progress=False)
    assert trace.layers == [1]
    assert (trace.flat(1).sum(dim=1) == 10).all()          # round(0.25 * 40) per token


def test_token_batches_spread_over_the_stream():
    batches = sp.token_batches(np.arange(100), seq_len=10, batch_size=8, max_tokens=30, spread=True)
    assert [b[0].item() for b in batches[0]] == [0, 40, 90]     # sequences 0, 4.5 -> 4, 9


def test_mass_mask_keeps_fewest_neurons_holding_the_mass():
    act = torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])   # totals 10 and 4
    rule = MaskRule(kind="mass", mass=0.7, weight_by_down_norm=False)
    # row 0: 4 + 3 = 7 reaches 70%; row 1: three of four ones are needed for 2.8
    assert sp.active_mask(act, rule).tolist() == [[True, True, False, False], [True, True, True, False]]
    assert sp.active_mask(act, MaskRule(kind="mass", mass=1.0, weight_by_down_norm=False)).all()


def test_fit_seq_len_caps_at_the_model_context():
    model = tiny_opt()                                   # max_position_embeddings=64
    assert sp.fit_seq_len(model, 256) == 64 and sp.fit_seq_len(model, 32) == 32
