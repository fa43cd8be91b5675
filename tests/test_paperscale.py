"""Paper scale as a real model: OPT 6.7B's geometry built on the meta device, every method through the one engine
and the one dense streaming path, at a tiny geometry: exact bytes, DRAM contents, file reuse, model bytes."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from flashlib import bench, costmodel, layout, paper, paperscale as ps
from flashlib.config import PAPER_SCALE_PRESETS, TRACE_PRESETS
from flashlib.window import SlidingWindow

TINY = dataclasses.replace(
    PAPER_SCALE_PRESETS["smoke"], folder="tiny", n_layers=2, d_model=256, d_ffn=1024, n_heads=4,
    vocab_size=64, max_positions=66, predictor_rank=8, predictor_rank_sensitive=32,
    predictor_sensitive_layers=1, flash_preset="compact", n_tokens=40, rounds=2, prompt_tokens=4, new_tokens=4,
    probe_seconds=0.0, stream_chunk_bytes=64 << 10, dram_fraction=0.9, dtypes=("float32", "bfloat16"))


@pytest.fixture(scope="module")
def files():
    """Both flash files and the stream file at the tiny geometry (smoke mode: under build/smoke/flash)."""
    for p in [*ps.flash_paths(TINY).values(), ps.stream_path(TINY)]:
        p.unlink(missing_ok=True)
    return ps.ensure_files(TINY, progress=False)


def generate(method, dtype="float32", start=0):
    with ps.build_runner(method, TINY, dtype, trace_start=start) as r:
        ids = torch.tensor([ps.prompt_ids(TINY, 0)])
        n = ps.span(TINY, method) - TINY.prompt_tokens
        out = r.generate(ids, max_new_tokens=n, min_new_tokens=n)
        return r, out


def test_the_model_is_opt_on_the_meta_device_and_its_files_hold_every_weight(files):
    model = ps.meta_model(TINY)
    assert type(model).__name__ == "OPTForCausalLM" and all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight          # tied, as OPT
    built = ps.build_model(TINY, "float32", resident=True)
    ffn = set(ps.ffn_weight_names(TINY))
    for name, p in built.named_parameters():
        assert p.is_meta == (name in ffn), name                     # the FFN lives only on flash
        if not p.is_meta:
            want = ps.synthetic_values(TINY, name, tuple(p.shape)).astype(np.float32)
            assert np.array_equal(p.detach().numpy(), want), name   # fp16 on disk -> fp32 exactly
    assert built.lm_head.weight is built.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("method", ["predictor", "windowing", "bundling"])
def test_sparse_rows_read_exactly_what_the_window_over_the_trace_asks_for(files, method):
    r, out = generate(method, start=3)
    run, _ = ps.traces(TINY)
    trace = run.predicted[3:3 + ps.span(TINY, method)]
    k = 0 if method == "predictor" else TINY.window_k
    wins = [SlidingWindow(TINY.d_ffn, k) for _ in range(TINY.n_layers)]
    want = []
    for t in range(trace.shape[0] - 1):                  # every position but the last generated token's
        want.append(sum(w.update(trace[t, l]).load.size for l, w in enumerate(wins)))
    s = out.stats
    got = [int(s.loc[0, "neurons_loaded"])] + s["neurons_loaded"].iloc[1:].tolist()
    assert got == [sum(want[:TINY.prompt_tokens])] + want[TINY.prompt_tokens:]
    slot = r.store.slot_bytes
    assert (s["bytes_read"] == s["neurons_loaded"] * slot).all()
    assert (s["truncated"] == 0).all() and (s["shrunk"] == 0).all()
    if method != "bundling":                             # separate layout: an up and a down read per run
        assert (s["reads"] % 2 == 0).all()


def test_the_matrices_hold_the_file_rows_converted_and_the_budget_is_half_the_model(files):
    for dtype in ("float32", "bfloat16"):
        r = ps.build_runner("bundling", TINY, dtype)
        r.generate(torch.tensor([ps.prompt_ids(TINY, 0)]), max_new_tokens=2, min_new_tokens=2)
        assert r.budget.budget_bytes == int(TINY.dram_fraction * r.model_bytes)
        assert r.budget.used_bytes <= r.budget.budget_bytes and r.dtype == getattr(torch, dtype)
        for l, st in enumerate(r.flash.layers):
            ids = st.matrix.resident_ids()
            ref = ps.ffn_layer(TINY, l)
            want = torch.from_numpy(np.concatenate([ref["up"][ids], ref["down"][ids]], axis=1)).to(r.dtype)
            assert ids.size and torch.equal(st.matrix.rows_of(ids), want)          # fp16 file -> compute dtype
        r.close()


def test_dense_rows_read_the_whole_model_or_what_is_not_resident_and_agree(files):
    outs = {}
    for m in ("naive", "hybrid", "pagecache"):
        r, out = generate(m)
        outs[m] = out.tokens
        d = out.stats
        if m == "naive":
            total = sum(p.stat().st_size for p in (r.files.stream,)) + sum(
                l["nbytes"] for l in layout.read_manifest(r.files.flash)["layers"])
            assert (d["bytes_read"] == total).all() and (d["mem_ms"] == 0).all()
        if m == "hybrid":
            assert r.resident_groups and (d["bytes_read"] < total).all()
    assert torch.equal(outs["naive"], outs["hybrid"]) and torch.equal(outs["naive"], outs["pagecache"])


def test_flash_and_stream_files_are_reused_checked_and_rewritten(files, tmp_path, monkeypatch):
    assert set(files["action"]) == {"written"}
    monkeypatch.setenv("FLASHLIB_FLASH_DIR", str(tmp_path))
    first = ps.ensure_files(TINY, smoke=False, progress=False)
    again = ps.ensure_files(TINY, smoke=False, progress=False)
    assert set(again["action"]) == {"reused"}
    path = ps.flash_paths(TINY, smoke=False)["bundled"]
    assert first.loc[0, "file_gb"] * 1e9 == path.stat().st_size == ps.file_bytes(TINY, "bundled")
    # a changed row fails the spot check (the manifest still matches) and the file is rewritten
    m = layout.read_manifest(path)
    with open(path, "r+b") as f:
        f.seek(m["layers"][0]["offset"])
        f.write(b"\x00" * 64)
    assert ps.check_flash_file(path, TINY, "bundled", "manifest") == []
    assert ps.check_flash_file(path, TINY, "bundled", "spot") != []
    # a changed value of the last layer fails the stream file's spot check
    sp = ps.stream_path(TINY, smoke=False)
    with open(sp, "r+b") as f:
        f.seek(-4096, 2)
        f.write(b"\x7f" * 64)
    assert ps.check_stream_file(TINY, smoke=False, verify="manifest") == []
    assert any("differ" in p for p in ps.check_stream_file(TINY, smoke=False))
    redo = ps.ensure_files(TINY, smoke=False, progress=False)
    assert redo.loc[0, "action"].startswith("rewritten") and redo.loc[1, "action"] == "reused"
    assert redo.loc[2, "action"].startswith("rewritten")
    assert ps.check_flash_file(path, TINY, "bundled", "full") == [] and ps.check_stream_file(TINY, smoke=False) == []
    other = dataclasses.replace(TINY, weight_seed=1)             # another seed is another model
    assert any("model_name" in p for p in ps.check_flash_file(path, other, "bundled", "manifest"))
    assert any("model_name" in p for p in ps.check_stream_file(other, smoke=False, verify="manifest"))
    with pytest.raises(ValueError, match="verify"):
        ps.check_flash_file(path, TINY, "bundled", "sometimes")


def test_full_geometry_is_opt_6_7b():
    cfg = PAPER_SCALE_PRESETS["full"]
    mb = ps.model_bytes(cfg)
    assert mb.total_bytes / 1e9 == pytest.approx(paper.OPT67B_SIZE_GB, rel=0.01)       # 13.31 vs 13.4 GB
    assert mb.ffn_share == pytest.approx(paper.FFN_SHARE_OPT67B, abs=0.002)
    parts = ps.model_parts(cfg)
    assert parts["attention"] / mb.total_bytes == pytest.approx(paper.ATTENTION_SHARE_OPT67B, abs=0.002)
    assert ps.bundle_bytes(cfg) == 16 * 1024 and parts["ffn"] == 32 * 16384 * 16 * 1024      # 8.6 GB per layout
    assert mb.predictor_share == pytest.approx(0.0235, abs=0.001)                             # App. B.3 "< 2.4%"
    assert ps.trace_config(cfg) == TRACE_PRESETS["paper"]                  # the calibrated preset, unchanged
    assert ps.predictor_ranks(cfg) == [128] * 28 + [1024] * 4              # Table 4
    # the meta model has exactly these bytes (the engine counts them), and OPT 6.7B's shapes
    model = ps.meta_model(cfg)
    from flashlib.engine import unique_parameters
    assert sum(p.numel() * 2 for _, p in unique_parameters(model)) == sum(parts.values())
    assert model.config.ffn_dim == 16384 and model.config.num_hidden_layers == 32 and model.config.hidden_size == 4096
    preds = ps.synthetic_predictors(dataclasses.replace(cfg, n_layers=2, predictor_sensitive_layers=1))
    assert sum(p.numel() for p in preds.parameters()) == 4096 * 128 + 128 * 16384 + 16384 + 4096 * 1024 + 1024 * 16384 + 16384


def test_synthetic_weights_are_deterministic_and_scaled():
    a, b = ps.ffn_layer(TINY, 1), ps.ffn_layer(TINY, 1)
    assert a["up"].dtype == np.float16 and a["up"].shape == (TINY.d_ffn, TINY.d_model)
    assert np.array_equal(a["up"], b["up"]) and not np.array_equal(a["up"], ps.ffn_layer(TINY, 0)["up"])
    mag = np.abs(a["down"].astype(np.float32))
    assert mag.min() >= 2.0 ** -5 and mag.max() < 2.0 ** -4            # d_model 256: |w| in [1/32, 1/16)
    q = ps.synthetic_values(TINY, "model.decoder.layers.0.self_attn.q_proj.weight", (TINY.d_model, TINY.d_model))
    k = ps.synthetic_values(TINY, "model.decoder.layers.0.self_attn.k_proj.weight", (TINY.d_model, TINY.d_model))
    assert q.dtype == np.float16 and not np.array_equal(q, k)
    assert np.abs(q.astype(np.float32)).min() >= 2.0 ** -5
    assert (ps.synthetic_values(TINY, "model.decoder.layers.0.self_attn_layer_norm.weight", (4,)) == 1).all()


def test_plan_alternates_every_variant_over_its_own_trace_segment():
    p = ps.plan(TINY)
    assert list(p.specs) == ["naive", "hybrid", "predictor", "windowing", "bundling", "pagecache",
                             "naive-bf16", "bundling-bf16"]
    assert p.budgets["naive"] == 0 and p.budgets["bundling"] == int(0.9 * sum(ps.model_parts(TINY, 4).values()))
    assert p.budgets["bundling-bf16"] == int(0.9 * sum(ps.model_parts(TINY, 2).values()))
    assert p.mapped["pagecache"] and not p.mapped["bundling"]
    assert p.trace_starts == {0: 0, 1: ps.span(TINY, "bundling")} and len(p.prompts) == TINY.rounds
    assert {s.dtype for s in p.specs.values()} == {"float32", "bfloat16"} and p.specs["naive"].new_tokens == 2
    with pytest.raises(ValueError, match="n_tokens"):
        ps.plan(dataclasses.replace(TINY, n_tokens=10))


def test_tables_from_step_rows():
    """Table 2/3, the acceptance checks and Fig 1 from a synthetic worker result (known answers)."""
    rows = []
    for m, io, mem, comp, b, reads in (("naive", 2000, 0, 900, 13e9, 13000), ("hybrid", 1000, 0, 900, 6.5e9, 6500),
                                       ("predictor", 700, 50, 400, 0.9e9, 60000), ("windowing", 200, 50, 400, 0.2e9, 13000),
                                       ("bundling", 90, 50, 400, 0.2e9, 6500), ("pagecache", 9000, 0, 900, 13e9, 3e6)):
        for t in range(3):
            rows.append({"method": m, "rep": t, "phase": "decode", "io_ms": io, "mem_ms": mem, "compute_ms": comp,
                         "total_ms": io + mem + comp, "forward_ms": 1.0, "bytes_read": b, "reads": reads,
                         "neurons_loaded": 1, "bytes_resident": 1, "shrunk": 0, "truncated": 0})
    info = pd.DataFrame([{"method": m, "base_method": m, "dtype": "bfloat16", "dram_bytes": 6e9, "model_bytes": 13e9,
                          "window_k": 5, "io_mode": "o_direct"} for m in ps.variants(TINY)][:6])
    runs = pd.DataFrame([{"method": m, "limit_bytes": 7e9, "peak_bytes": 6.9e9, "failcnt": 0, "oom_kill": 0,
                          "status": "ok"} for m in info["method"]])
    from flashlib.workers import Result
    res = Result(pd.DataFrame(rows), runs, pd.DataFrame(), info, pd.DataFrame(), pd.DataFrame())
    prof = costmodel.DeviceProfile("flat", {32: ((512, 1e8), (1 << 20, 1e9))}, dense_gbps=1.0)
    s = ps.summary(res, prof)
    assert s["method"].tolist()[:5] == list(ps.METHOD_NAMES)
    t2 = bench.table2(s)
    r = t2.set_index("method").loc["bundling"]
    assert r["io_ms_computed"] == pytest.approx(prof.io_ms(0.2e9, 0.2e9 / 6500))
    assert t2["paper_io_ms"].tolist() == [row[-1] for row in paper.TABLE2_ROWS]
    acc = ps.acceptance(s, TINY).set_index("check")
    assert acc.loc["I/O naive / All (fp32)", "ours"] == pytest.approx(2000 / 90) and acc.loc["I/O naive / All (fp32)", "ok"]
    assert acc.loc["memory management share of All (fp32)", "ours"] == pytest.approx(50 / 540)
    t3 = bench.table3(s, "OPT 6.7B geometry")
    assert {"Naive", "All", "Page cache (mmap)"} <= set(t3["method"]) and (t3["source"] == "paper (M1 Max CPU)").sum() == 2
    assert (ps.fig1_frame(t3).groupby("source").size() == 2).all()


def test_compare_traces_puts_the_same_statistics_side_by_side():
    tr, _ = ps.traces(TINY)
    same = {"active": tr.active[None], "predicted": tr.predicted[None]}
    cmp = ps.compare_traces(tr, same, k=5)
    ov = cmp["overall"]
    assert np.allclose(ov["synthetic"], ov["measured"])
    assert ov.set_index("statistic").loc["predicted / active", "paper"] == paper.PREDICTED_OVER_ACTIVE
    curve = cmp["curve"]
    assert set(curve["source"]) == {"synthetic", "measured"} and (curve.groupby("source")["s_agg"].is_monotonic_increasing).all()
    assert isinstance(cmp["per_layer"], pd.DataFrame) and len(cmp["per_layer"]) == 2 * TINY.n_layers
