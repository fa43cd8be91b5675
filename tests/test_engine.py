"""Sparse engine (paper sec 3, Table 3): dense equivalence, budget invariants, failure handling."""
import copy
import dataclasses
import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flashlib import engine as eng
from flashlib.clock import EngineError, GenerationInterrupted
from flashlib.config import ENGINE, MaskRule
from flashlib.dram import DramBudgetError
from flashlib.models import ffn_adapter, load_model
from flashlib.predictor import PredictorMeta, Predictors
from flashlib.store import ChecksumError

NEW = 8


@pytest.fixture(scope="module")
def smoke():
    model, tok = load_model("relu-opt-smoke", progress=False)
    ids = tok("The king said that the", return_tensors="pt")["input_ids"]
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=tok.eos_token_id)
    return model, tok, ids, dense


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("flash")


def calib(model, n=3, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (1, T), generator=g) for _ in range(n)]


def build(smoke, root, predictors=None, **kw):
    model = copy.deepcopy(smoke[0])
    cfg = dataclasses.replace(ENGINE, **kw)
    return eng.SparseEngine(model, "relu-opt-smoke", cfg, predictors=predictors, calibration=calib(model),
                            flash_root=root)


def random_predictors(model, threshold=0.0, seed=0):
    a = ffn_adapter(model)
    meta = PredictorMeta("relu-opt-smoke", a.family, a.n_layers, a.d_model, a.d_ffn,
                         ranks={l: 8 for l in range(a.n_layers)}, label_rule=MaskRule(),
                         thresholds={l: threshold for l in range(a.n_layers)})
    torch.manual_seed(seed)
    return Predictors(meta).eval()


# --- equivalence with the dense model ---------------------------------------------------------

@pytest.mark.parametrize("policy", ["all", "oracle"])
def test_greedy_equals_dense_on_the_relu_opt(smoke, root, policy):
    with build(smoke, root, policy=policy, dram_budget=None) as e:
        r = e.generate(smoke[2], max_new_tokens=NEW)
        assert torch.equal(r.tokens, smoke[3])
        if policy == "oracle":     # the window re-used neurons: fewer loads than active neurons
            assert e.layer_report()["hit_rate"].min() > 0


def test_oracle_within_a_tight_budget_still_equals_dense(smoke, root):
    with build(smoke, root, policy="oracle", dram_budget=None) as probe:
        tight = int(probe.sizing.table.loc[1, "need_bytes"])
    with build(smoke, root, policy="oracle", dram_budget=tight) as e:
        r = e.generate(smoke[2], max_new_tokens=NEW)
        assert torch.equal(r.tokens, smoke[3])
        assert (r.stats["bytes_resident"] <= e.budget.budget_bytes).all()


def test_sampling_with_every_neuron_equals_dense_sampling(smoke, root):
    model, tok, ids, _ = smoke
    torch.manual_seed(7)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=True,
                          top_p=0.9, pad_token_id=tok.eos_token_id)
    with build(smoke, root, policy="all", dram_budget=None) as e:
        torch.manual_seed(7)
        assert torch.equal(e.generate(ids, max_new_tokens=NEW, do_sample=True, top_p=0.9).tokens, want)


def test_layouts_and_matrix_variants_agree(smoke, root):
    outs = {}
    for lay, pre in [("bundled", True), ("separate", True), ("bundled", False)]:
        with build(smoke, root, policy="oracle", dram_budget=None, layout=lay, preallocated=pre) as e:
            r = e.generate(smoke[2], max_new_tokens=NEW)
            outs[(lay, pre)] = (r.tokens, int(r.stats["reads"].sum()), int(r.stats["neurons_loaded"].sum()))
    toks = [v[0] for v in outs.values()]
    assert all(torch.equal(t, smoke[3]) for t in toks)
    assert outs[("separate", True)][2] == outs[("bundled", True)][2]        # same neurons loaded...
    assert outs[("separate", True)][1] > outs[("bundled", True)][1]         # ...in more reads


def test_gated_llama_with_every_neuron_equals_dense(root):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 7))
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    with eng.SparseEngine(model, "tiny-llama", dataclasses.replace(ENGINE, policy="all", dram_budget=None),
                          flash_root=root) as e:
        r = e.generate(ids, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(r.tokens, dense)


@pytest.mark.slow
def test_smollm2_with_every_neuron_equals_dense():
    model, tok = load_model("smollm2", progress=False)
    ids = tok("Paris is the capital of", return_tensors="pt")["input_ids"]
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=tok.eos_token_id)
    cfg = dataclasses.replace(ENGINE, policy="all", dram_budget=None, verify=False)
    with eng.SparseEngine(model, "smollm2", cfg) as e:     # flash file cached under build/smoke/flash
        assert torch.equal(e.generate(ids, max_new_tokens=NEW).tokens, dense)


# --- the per-token loop: budget, window, accounting ----------------------------------------

def test_predictor_run_stays_within_budget_and_accounts_every_step(smoke, root):
    preds = random_predictors(smoke[0])
    with build(smoke, root, predictors=preds, dram_budget=None, window_k=2) as e:
        r = e.generate(smoke[2], max_new_tokens=NEW)
        s = r.stats
        assert list(s["phase"]) == ["prefill"] + ["decode"] * (len(s) - 1)
        assert s.loc[0, "n_tokens"] == smoke[2].shape[1]
        assert np.allclose(s["io_ms"] + s["mem_ms"] + s["compute_ms"], s["total_ms"])
        assert (s["bytes_resident"] <= e.budget.budget_bytes).all()
        assert e.budget.used_bytes <= e.budget.budget_bytes
        assert s["bytes_read"].sum() == s["neurons_loaded"].sum() * e.store.slot_bytes
        assert s["reads"].sum() <= s["neurons_loaded"].sum()                  # adjacent ids coalesce
        for st in e.flash.layers:
            assert st.matrix.num_used <= st.capacity
            assert set(st.matrix.resident_ids().tolist()) == set(st.window.resident_ids().tolist())


def test_window_is_shrunk_not_overrun_when_a_union_exceeds_the_matrix(smoke, root):
    preds = random_predictors(smoke[0], threshold=0.0)
    with build(smoke, root, predictors=preds, dram_budget=None, window_k=6, capacity_margin=0.0) as e:
        for st in e.flash.layers:                   # pretend the calibration saw smaller unions
            st.capacity = max(1, st.capacity // 2)
        r = e.generate(smoke[2], max_new_tokens=NEW)
        assert r.stats["shrunk"].sum() + r.stats["truncated"].sum() > 0
        assert all(st.matrix.num_used <= st.capacity for st in e.flash.layers)


def test_quantile_matrices_shrink_the_window_but_keep_oracle_output_exact(smoke, root):
    def engine(**kw):                 # calibrated on the text it will generate: unions of its windows
        cfg = dataclasses.replace(ENGINE, policy="oracle", dram_budget=None, window_k=6, capacity_margin=0.0, **kw)
        return eng.SparseEngine(copy.deepcopy(smoke[0]), "relu-opt-smoke", cfg, calibration=[smoke[3]],
                                flash_root=root)

    with engine() as full:
        want = full.generate(smoke[2], max_new_tokens=NEW).tokens
    with engine(capacity_quantile=0.3, read_buffer_rows=3) as e:
        assert sum(e.sizing.capacities) < sum(full.sizing.capacities)
        assert e.sizing.buffer_rows == 3 and e.buffer.capacity == 3
        r = e.generate(smoke[2], max_new_tokens=NEW)
        assert torch.equal(r.tokens, want) and torch.equal(r.tokens, smoke[3])
        assert r.stats["shrunk"].sum() > 0 and r.stats["truncated"].sum() == 0
        assert (r.stats["bytes_resident"] <= e.budget.budget_bytes).all()


def test_the_largest_window_that_fits_is_chosen(smoke, root):
    e_small = build(smoke, root, policy="oracle", dram_budget=None, window_k=1)
    e_small.close()
    need1 = int(e_small.sizing.table.loc[1, "need_bytes"])
    with build(smoke, root, policy="oracle", dram_budget=need1) as e:
        t = e.sizing.table
        assert e.sizing.k >= 1 and t.loc[e.sizing.k, "need_bytes"] <= need1
        assert e.sizing.k == t.loc[t["fits"], "k"].max()


def test_a_new_sequence_starts_with_empty_caches_also_through_model_generate(smoke, root):
    with build(smoke, root, policy="oracle", dram_budget=None) as e:
        ids = smoke[2]
        a = e.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=1)
        b = e.generate(ids, max_new_tokens=NEW).tokens
        assert torch.equal(a, smoke[3]) and torch.equal(b, smoke[3])
        assert list(e.clock.frame()["phase"]).count("prefill") == 2


# --- refusals and failures ---------------------------------------------------------------

def test_too_small_a_budget_is_refused_with_the_minimum_before_any_read(smoke, tmp_path):
    with pytest.raises(DramBudgetError, match=r"minimum budget is \d+ B.*nothing was read"):
        build(smoke, tmp_path, policy="oracle", dram_budget=0.05)
    assert not any(tmp_path.rglob("*.safetensors"))          # no flash file written, none read


def test_a_window_that_does_not_fit_is_refused(smoke, root):
    with pytest.raises(DramBudgetError, match="smaller window k"):  # k=6 given
        build(smoke, root, policy="oracle", dram_budget=0.5, window_k=6)


def test_batch_above_one_is_refused(smoke, root):
    with build(smoke, root, policy="all", dram_budget=None) as e:
        with pytest.raises(EngineError, match="batch size 1"):
            e.generate(smoke[2].repeat(2, 1), max_new_tokens=2)


def test_a_corrupted_flash_file_fails_verification(smoke, tmp_path):
    with build(smoke, tmp_path, policy="all", dram_budget=None) as e:
        path = e.flash_path
    with open(path, "r+b") as f:                 # flip a byte inside layer 0's data
        f.seek(e.store.manifest["layers"][0]["offset"] + 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="layer"):
        build(smoke, tmp_path, policy="all", dram_budget=None)


def test_a_short_read_mid_run_stops_with_a_clear_error(smoke, tmp_path):
    e = build(smoke, tmp_path, policy="all", dram_budget=None)
    os.truncate(e.flash_path, e.store.manifest["layers"][1]["offset"] + 512)   # layer 1 cut short
    with pytest.raises(EngineError, match="short read.*no dense fallback"):
        e.generate(smoke[2], max_new_tokens=2)
    e.close()


def test_an_interrupted_run_says_so_and_the_engine_stays_usable(smoke, root, monkeypatch):
    e = build(smoke, root, policy="oracle", dram_budget=None)
    real, calls = e.store.read, {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(e.store, "read", flaky)
    with pytest.raises(GenerationInterrupted, match="interrupted after"):
        e.generate(smoke[2], max_new_tokens=NEW)
    assert torch.equal(e.generate(smoke[2], max_new_tokens=NEW).tokens, smoke[3])   # reset, not stale
    e.close()


# --- small pieces -------------------------------------------------------------------------

def test_parse_budget():
    assert eng.parse_budget(0.5, 1000, 300, 600) == 500
    assert eng.parse_budget("0.25", 1000, 300, 600) == 250
    assert eng.parse_budget(2048, 1000, 300, 600) == 2048
    assert eng.parse_budget("2KiB", 1000, 300, 600) == 2048
    assert eng.parse_budget("ffn:0.5", 1000, 300, 600) == 600
    assert eng.parse_budget(None, 1000, 300, 600) is None
    for bad in (-1, 0, "lots"):
        with pytest.raises(ValueError):
            eng.parse_budget(bad, 1000, 300, 600)


def test_peak_rows_and_sizing_known_answer():
    trace = np.zeros((1, 4, 1, 10), dtype=bool)          # one sequence, 4 tokens, 1 layer
    for t, ids in enumerate([[0, 1], [1, 2], [3], [0]]):
        trace[0, t, 0, ids] = True
    peaks = eng.peak_rows(trace, max_k=3)
    assert peaks[:, 0].tolist() == [2, 2, 3, 4]           # k=0: largest set; k=1..3: largest unions
    s = eng.size_window(peaks, 10, 1, resident=100, row_bytes=10, slot=4, budget=100 + 30 + 8, k=None,
                        margin=0.0)
    assert s.k == 2 and s.capacities == (3,)               # k=2 needs 3 rows: 30 B, buffer 2 rows: 8 B
    assert s.buffer_rows == 2
    with pytest.raises(DramBudgetError, match="minimum budget is 128 B"):     # k=0: 2 rows + buffer
        eng.size_window(peaks, 10, 1, resident=100, row_bytes=10, slot=4, budget=127, k=None, margin=0.0)
    s1 = eng.size_window(peaks, 10, 1, resident=100, row_bytes=10, slot=4, budget=None, k=2, margin=0.0,
                         buffer_rows=1)
    assert s1.buffer_rows == 1 and int(s1.table.loc[2, "need_bytes"]) == 100 + 30 + 4
    # a byte budget: k=3 (140 B + buffer) does not fit 138 B; what k=2 leaves (4 B) grows the buffer
    s2 = eng.size_window(peaks, 10, 1, resident=100, row_bytes=10, slot=4, budget=138, k=None, margin=0.0,
                         buffer_rows=1)
    assert s2.k == 2 and s2.buffer_rows == 2
    s3 = eng.size_window(peaks, 10, 1, resident=100, row_bytes=10, slot=4, budget=10_000, k=1, margin=0.0,
                         buffer_rows=1)
    assert s3.k == 1 and s3.buffer_rows == 2              # never past the largest single active set


def test_quantile_peak_rows_known_answer():
    trace = np.zeros((1, 5, 1, 10), dtype=bool)
    for t, ids in enumerate([[0, 1], [2, 3], [4], [5, 6, 7], [1]]):
        trace[0, t, 0, ids] = True
    # rows k = 0..3; sets of k=1: 2, 2, 1, 3, 1; unions of k=2: 4, 3, 4, 4; of k=3: 5, 6, 5
    assert eng.peak_rows(trace, max_k=3)[:, 0].tolist() == [3, 3, 4, 6]
    assert eng.peak_rows(trace, max_k=3, quantile=0.5)[:, 0].tolist() == [3, 3, 4, 5]
    assert eng.peak_rows(trace, max_k=3, quantile=0.01)[:, 0].tolist() == [3, 3, 4, 5]  # k=1: 1 -> 3
    with pytest.raises(ValueError, match="quantile"):
        eng.peak_rows(trace, max_k=3, quantile=0.0)
