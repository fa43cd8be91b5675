"""One engine for every tier: a shared contract drives the small-model tier (an HF model whose flash file is
written from its own weights) and the paper-scale tier (OPT's geometry on the meta device, FFN only on flash)
through the one sparse FFN path and the one dense streaming path: same trace, same counters, same bytes."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from flashlib import engine as eng, paperscale as ps
from flashlib.config import ENGINE, PAPER_SCALE_PRESETS
from flashlib.flashffn import pair_evictions
from flashlib.streaming import StreamingBaseline, WeightFiles
from flashlib.window import SlidingWindow

L, D, F, V = 2, 64, 256, 96
GEOMETRY = dataclasses.replace(
    PAPER_SCALE_PRESETS["smoke"], folder="contract", n_layers=L, d_model=D, d_ffn=F, n_heads=4, vocab_size=V,
    max_positions=66, predictor_rank=8, predictor_rank_sensitive=16, predictor_sensitive_layers=1,
    flash_preset="compact", n_tokens=24, prompt_tokens=4, new_tokens=5, stream_chunk_bytes=8 << 10)
PROMPT = torch.tensor([[5, 9, 2, 44]])
NEW = 5


def small_opt(seed=0) -> OPTForCausalLM:
    """A random OPT of the same geometry as GEOMETRY, its FFN weights real (the small-model tier)."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=F, num_hidden_layers=L, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=D, activation_function="relu")
    return OPTForCausalLM(cfg).eval()


def trace(seed=1, density=0.2) -> np.ndarray:
    """A random active-set trace ``[T, L, F]`` shared by both tiers."""
    return np.random.default_rng(seed).random((PROMPT.shape[1] + NEW, L, F)) < density


def expected_loads(t: np.ndarray, k: int) -> list[int]:
    """Neurons a fresh window of k loads per position (what both tiers must read), all layers."""
    wins = [SlidingWindow(F, k) for _ in range(L)]
    return [sum(w.update(t[p, l]).load.size for l, w in enumerate(wins)) for p in range(t.shape[0] - 1)]


@pytest.fixture(scope="module")
def paper_files():
    for p in [*ps.flash_paths(GEOMETRY).values(), ps.stream_path(GEOMETRY)]:
        p.unlink(missing_ok=True)
    ps.ensure_files(GEOMETRY, progress=False)
    return ps.flash_paths(GEOMETRY)


def sparse_engine(tier: str, tr: np.ndarray, root, k: int = 3, **kw):
    cfg = dataclasses.replace(ENGINE, policy="trace", dram_budget=None, window_k=k, max_window_k=k,
                              verify=False, **kw)
    if tier == "small":
        return eng.SparseEngine(small_opt(), "contract-small", cfg, trace=tr, sizing_trace=tr, flash_root=root)
    cfg = dataclasses.replace(cfg, flash_dtype="float16", flash_preset=GEOMETRY.flash_preset)
    return eng.SparseEngine(ps.build_model(GEOMETRY, "float32"), "contract-paper", cfg, trace=tr, sizing_trace=tr,
                            flash_path=ps.flash_paths(GEOMETRY)[cfg.layout])


def steps_of(r) -> list[int]:
    s = r.stats
    return [int(x) for x in s["neurons_loaded"]]


@pytest.mark.parametrize("tier", ["small", "paper"])
@pytest.mark.parametrize("layout", ["bundled", "separate"])
def test_both_tiers_run_the_same_sparse_path_with_the_same_counters(tier, layout, paper_files, tmp_path):
    tr = trace()
    want = expected_loads(tr, 3)
    with sparse_engine(tier, tr, tmp_path, layout=layout) as e:
        r = e.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW)
        got = steps_of(r)
        assert got == [sum(want[:PROMPT.shape[1]])] + want[PROMPT.shape[1]:]
        s = r.stats
        assert (s["bytes_read"] == s["neurons_loaded"] * e.store.slot_bytes).all()
        assert (s["shrunk"] == 0).all() and (s["truncated"] == 0).all()
        assert type(e.flash).__name__ == "FlashFFN"            # the one per-token path
        # the matrices hold exactly the last k positions' neurons
        for l, st in enumerate(e.flash.layers):
            assert set(st.matrix.resident_ids().tolist()) == set(np.flatnonzero(tr[-4:-1, l].any(axis=0)).tolist())


@pytest.mark.parametrize("tier", ["small", "paper"])
def test_both_tiers_stream_densely_through_the_same_path(tier, paper_files, tmp_path):
    if tier == "small":
        run = StreamingBaseline(small_opt(), "contract-small", 0.0, flash_root=tmp_path)
    else:
        run = StreamingBaseline(ps.build_model(GEOMETRY, "float32", resident=False), "contract-paper", 0.0,
                                files=WeightFiles(paper_files["bundled"], ps.stream_path(GEOMETRY)))
    with run:
        r = run.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW)
        ffn = sum(l["nbytes"] for l in run.src.store.manifest["layers"])
        stream = sum(g["nbytes"] for g in run.manifest["groups"].values())
        assert (r.stats["bytes_read"] == ffn + stream).all() and (r.stats["neurons_loaded"] == L * F).all()


def test_trace_with_every_neuron_active_equals_the_dense_model(tmp_path):
    model = small_opt()
    dense = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=1)
    everything = np.ones((PROMPT.shape[1] + NEW, L, F), dtype=bool)
    with sparse_engine("small", everything, tmp_path) as e:
        assert torch.equal(e.generate(PROMPT, max_new_tokens=NEW, pad_token_id=1).tokens, dense)


def test_the_paper_scale_engine_with_every_neuron_equals_its_dense_streaming_twin(paper_files):
    """The same synthetic weights through the engine (all active) and through naive streaming."""
    everything = np.ones((PROMPT.shape[1] + NEW, L, F), dtype=bool)
    cfg = dataclasses.replace(ENGINE, policy="trace", dram_budget=None, window_k=1, max_window_k=1, verify=False,
                              flash_dtype="float16", flash_preset=GEOMETRY.flash_preset)
    with eng.SparseEngine(ps.build_model(GEOMETRY, "float32"), "p", cfg, trace=everything, sizing_trace=everything,
                          flash_path=paper_files["bundled"]) as e:
        a = e.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW).tokens
    with StreamingBaseline(ps.build_model(GEOMETRY, "float32", resident=False), "p", 0.0, chunk_bytes=1 << 30,
                           files=WeightFiles(paper_files["bundled"], ps.stream_path(GEOMETRY))) as n:
        b = n.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW).tokens
    assert torch.equal(a, b)


def test_a_trace_too_short_for_the_generation_is_a_clear_error(tmp_path):
    from flashlib.clock import EngineError
    with sparse_engine("small", trace()[:3], tmp_path, k=1) as e:
        with pytest.raises(EngineError, match="the trace has 3 tokens; position 3"):
            e.generate(PROMPT, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="bool trace"):
        sparse_engine("small", trace()[:, :1], tmp_path)


def test_bf16_compute_converts_the_flash_rows_and_stays_close_to_dense(tmp_path):
    ids = PROMPT
    with torch.no_grad():
        ref = small_opt().to(torch.bfloat16)(ids).logits[0, -1].float()
    cfg = dataclasses.replace(ENGINE, policy="all", dram_budget=None, compute_dtype="bfloat16", verify=False)
    with eng.SparseEngine(small_opt(), "contract-bf16", cfg, flash_root=tmp_path) as e, torch.no_grad():
        assert e.dtype == torch.bfloat16 and e.flash_dtype == "float32" and e.conversion == "convert"
        got = e.model(ids).logits[0, -1].float()
        st = e.flash.layers[0]
        up = small_opt().model.decoder.layers[0].fc1.weight
        ids0 = st.matrix.resident_ids()
        assert torch.equal(st.matrix.vector("up")[torch.from_numpy(st.matrix.row_of[ids0])], up[ids0].to(torch.bfloat16))
    assert torch.allclose(got, ref, atol=0.05, rtol=0.05)


def test_capacity_budget_fills_what_the_budget_affords_and_shrinks_the_window():
    peaks = np.array([[4, 6], [6, 9], [8, 12], [10, 15]])     # k = 0..3 rows of a 2-layer model
    common = dict(d_ffn=100, n_layers=2, resident=1000, row_bytes=10, slot=10, k=3, margin=0.0, buffer_rows=1)
    full = eng.size_window(peaks, budget=1000 + 250 + 10, capacity="budget", **common)
    assert full.capacities == (10, 15) and full.buffer_rows == 1          # k=3 fits: Req_i, the rest to the buffer
    tight = eng.size_window(peaks, budget=1000 + 170 + 10, capacity="budget", **common)
    assert tight.k == 3 and sum(tight.capacities) <= 17 and tight.capacities >= (4, 6)   # between one token and k=3
    assert tight.capacities == (6, 10)                                   # the same share of each layer's need
    with pytest.raises(eng.DramBudgetError, match="minimum budget is 1110 B"):
        eng.size_window(peaks, budget=1100, capacity="budget", **common)  # not even one token's set
    with pytest.raises(ValueError, match="window_k"):
        eng.size_window(peaks, budget=2000, capacity="budget", **{**common, "k": None})


def test_read_rounds_pair_evictions_with_loads():
    ev = np.array([1, 3, 5, 7, 9, 11])
    chunks = [np.array([2, 3, 4]), np.array([6, 8]), np.array([10])]       # 3 comes back in round 0
    parts = pair_evictions(ev, chunks)
    assert [p.tolist() for p in parts] == [[1, 3, 5], [7, 9], [11]]
    assert all(np.all(np.diff(p) > 0) for p in parts)
    ev2 = np.array([4, 6])                                                   # 6 comes back in round 1
    assert [p.tolist() for p in pair_evictions(ev2, [np.array([1, 2]), np.array([6])])] == [[4], [6]]
    assert [p.tolist() for p in pair_evictions(ev, [np.array([1])])] == [ev.tolist()]
