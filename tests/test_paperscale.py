"""Paper-scale replay at a tiny geometry: exact bytes, DRAM contents, sparse FFN, file reuse, model bytes."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from flashlib import costmodel, layout, paper, paperscale as ps
from flashlib.config import PAPER_SCALE_PRESETS, TRACE_PRESETS
from flashlib.traces import generate_trace
from flashlib.window import SlidingWindow

TINY = dataclasses.replace(
    PAPER_SCALE_PRESETS["smoke"], folder="tiny", n_layers=2, d_model=256, d_ffn=1024, n_heads=4,
    vocab_size=64, max_positions=64, predictor_rank=8, predictor_rank_sensitive=32,
    predictor_sensitive_layers=1, flash_preset="compact", n_tokens=24, rounds=2, sparse_tokens=3,
    probe_seconds=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Flash files, a trace and matrix sizes at the tiny geometry (files in a temporary folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHLIB_FLASH_DIR", str(tmp_path_factory.mktemp("flash")))
        files = ps.ensure_flash_files(TINY, smoke=False, progress=False)
        paths = ps.flash_paths(TINY, smoke=False)
        trace = generate_trace(ps.trace_config(TINY), progress=False)
        caps = ps.matrix_rows(TINY, progress=False)
        yield {"files": files, "paths": paths, "trace": trace, "caps": caps}


@pytest.fixture(scope="module")
def result(tiny):
    return ps.replay(TINY, tiny["trace"], tiny["caps"], tiny["paths"], progress=False)


def _expected_loads(trace, k: int, start: int, warmup: int, n: int) -> list[int]:
    """Neurons a fresh window of k loads per timed token, from the trace alone."""
    wins = [SlidingWindow(TINY.d_ffn, k) for _ in range(TINY.n_layers)]
    out = []
    for i in range(warmup + n):
        loads = sum(w.update(trace.predicted[start + i, l]).load.size for l, w in enumerate(wins))
        if i >= warmup:
            out.append(loads)
    return out


def test_replay_reads_exactly_the_bytes_the_window_asks_for(tiny, result):
    raw, bundle = result.raw, ps.bundle_bytes(TINY)
    assert result.meta["io_mode"] == "o_direct"
    sparse = raw[raw["method"].isin(["predictor", "windowing", "bundling"])]
    assert (sparse["truncated"] == 0).all() and (sparse["shrunk"] == 0).all()
    # every neuron the window loads is read once, as one bundle or as two half-size vector reads
    assert (sparse["bytes_read"] == sparse["neurons_loaded"] * bundle).all()
    assert (sparse["neurons_read"] == sparse["neurons_loaded"]).all()
    sep = sparse[sparse["method"] != "bundling"]
    assert (sep["reads"] % 2 == 0).all()                 # one up and one down read per run of ids
    # and the loads are exactly what a window over the trace asks for (known answer)
    ms = {m.name: m for m in ps.methods(TINY)}
    for r, order, m, start, n in ps.block_schedule(TINY, tuple(ms.values())):
        if m.kind != "sparse":
            continue
        got = raw[(raw["method"] == m.name) & (raw["round"] == r)]["neurons_loaded"].tolist()
        assert got == _expected_loads(tiny["trace"], m.k, start, m.warmup, n), (m.name, r)
    # k = 0 loads the whole predicted set of every layer
    pred = raw[raw["method"] == "predictor"]
    assert pred["neurons_loaded"].tolist() == [int(tiny["trace"].predicted[t].sum()) for t in pred["token"]]
    # windowing and bundling read the same neurons, bundling in half as many reads (or fewer)
    w, b = (raw[raw["method"] == m].set_index(["round", "token"]) for m in ("windowing", "bundling"))
    assert (w["neurons_loaded"] == b["neurons_loaded"]).all() and (b["reads"] * 2 == w["reads"]).all()
    # dense rows: the whole FFN plus the non-FFN stand-in bytes (naive), half the model (hybrid)
    naive, hybrid = raw[raw["method"] == "naive"], raw[raw["method"] == "hybrid"]
    assert (naive["bytes_read"] == TINY.n_layers * (TINY.d_ffn + ps.nonffn_rows(TINY)) * bundle).all()
    assert (hybrid["bytes_read"] == TINY.n_layers * ps.hybrid_stream_rows(TINY) * bundle).all()
    assert set(result.meta["page_cache_after"].values()) == {0.0}


def test_dram_matrices_hold_the_file_rows_and_the_sparse_ffn_matches_a_dense_reference(tiny):
    ms = {m.name: m for m in ps.methods(TINY)}
    with torch.inference_mode(), ps.Replayer(TINY, tiny["trace"], tiny["caps"], tiny["paths"]) as rep:
        for name, start in (("bundling", 0), ("predictor", 9)):     # bundled, then separate layout
            rep.block(ms[name], start, 2)
            last = start + ms[name].warmup + 1
            for l, mat in enumerate(rep.matrices):
                ids = mat.resident_ids()
                assert ids.size and np.array_equal(np.sort(ids), rep_resident(ms[name], tiny["trace"], start, last, l))
                ref = ps.ffn_layer(TINY, l)
                want = np.concatenate([ref["up"][ids], ref["down"][ids]], axis=1).astype(np.float32)
                assert torch.equal(mat.rows_of(ids), torch.from_numpy(want))            # bit-exact fp16 -> fp32
                assert torch.equal(mat.scalar("bias")[torch.from_numpy(mat.row_of[ids])],
                                   torch.from_numpy(ps.ffn_bias(TINY, l).astype(np.float32)[ids]))
                # sparse FFN over the resident rows, restricted to the token's set == dense on that set
                active = np.flatnonzero(tiny["trace"].predicted[last, l])
                h = torch.randn(TINY.d_model, generator=torch.Generator().manual_seed(l))
                got = rep.compute.sparse_ffn(mat, h, active)
                x = torch.nn.functional.layer_norm(h, h.shape)
                up, down = (torch.from_numpy(ref[v][active].astype(np.float32)) for v in ("up", "down"))
                b = torch.from_numpy(ps.ffn_bias(TINY, l).astype(np.float32)[active])
                assert torch.allclose(got, torch.relu(up @ x + b) @ down, rtol=1e-4, atol=1e-5)


def rep_resident(m, trace, start: int, last: int, layer: int) -> np.ndarray:
    """Ids a fresh window of ``m.k`` holds after tokens start..last (k = 0: the last token's set)."""
    k = max(m.k, 1)
    return np.flatnonzero(trace.predicted[max(start, last - k + 1): last + 1, layer].any(axis=0))


def test_flash_files_are_reused_checked_and_rewritten(tiny, tmp_path, monkeypatch):
    assert set(tiny["files"]["action"]) == {"written"}
    monkeypatch.setenv("FLASHLIB_FLASH_DIR", str(tmp_path))
    first = ps.ensure_flash_files(TINY, smoke=False, progress=False)
    again = ps.ensure_flash_files(TINY, smoke=False, progress=False)
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
    assert ps.check_flash_file(path, TINY, "bundled", "full") != []
    redo = ps.ensure_flash_files(TINY, smoke=False, progress=False)
    assert redo.loc[0, "action"].startswith("rewritten") and redo.loc[1, "action"] == "reused"
    assert ps.check_flash_file(path, TINY, "bundled", "full") == []
    # another weight seed is another model: the manifest check refuses it
    other = dataclasses.replace(TINY, weight_seed=1)
    assert any("model_name" in p for p in ps.check_flash_file(path, other, "bundled", "manifest"))
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
    # hybrid streams half of the model, naive all of it, both within one row per layer
    row = ps.bundle_bytes(cfg)
    assert cfg.n_layers * ps.hybrid_stream_rows(cfg) * row == pytest.approx(0.5 * mb.total_bytes, abs=32 * row)
    naive = cfg.n_layers * (cfg.d_ffn + ps.nonffn_rows(cfg)) * row
    assert 0 <= naive - mb.total_bytes < cfg.n_layers * row
    assert ps.trace_config(cfg) == TRACE_PRESETS["paper"]                  # the calibrated preset, unchanged
    assert ps.predictor_ranks(cfg) == [128] * 28 + [1024] * 4              # Table 4


def test_synthetic_weights_are_deterministic_and_scaled():
    a, b = ps.ffn_layer(TINY, 1), ps.ffn_layer(TINY, 1)
    assert a["up"].dtype == np.float16 and a["up"].shape == (TINY.d_ffn, TINY.d_model)
    assert np.array_equal(a["up"], b["up"]) and not np.array_equal(a["up"], ps.ffn_layer(TINY, 0)["up"])
    mag = np.abs(a["down"].astype(np.float32))
    assert mag.min() >= 2.0 ** -5 and mag.max() < 2.0 ** -4            # d_model 256: |w| in [1/32, 1/16)
    assert abs(a["down"].astype(np.float32).mean()) < 1e-3


def test_block_schedule_rotates_and_checks_the_trace_length():
    ms = ps.methods(TINY)
    sched = ps.block_schedule(TINY, ms)
    assert len(sched) == TINY.rounds * len(ms)
    assert [s[2].name for s in sched[:5]] == [m.name for m in ms]
    assert [s[2].name for s in sched[5:]] == [m.name for m in ms[1:] + ms[:1]]
    assert {s[3] for s in sched if s[0] == 1} == {TINY.window_k + TINY.sparse_tokens}
    with pytest.raises(ValueError, match="n_tokens"):
        ps.block_schedule(dataclasses.replace(TINY, n_tokens=10), ms)


def test_tables_from_a_replay(tiny, result):
    s = ps.breakdown(result)
    assert s["method"].tolist() == list(ps.METHOD_NAMES) and (s["tokens"] > 0).all()
    prof = costmodel.DeviceProfile("flat", {32: ((512, 1e8), (1 << 20, 1e9))}, dense_gbps=1.0)
    t2 = ps.table2(s, prof, now=prof)
    # the computed column divides the replay's own bytes by the profile at the replay's read size
    r = t2.set_index("method").loc["bundling"]
    assert r["io_ms_computed"] == pytest.approx(prof.io_ms(r["flash_to_dram_gb"] * 1e9, r["chunk_kib"] * 1024))
    assert t2["paper_io_ms"].tolist() == [row[-1] for row in paper.TABLE2_ROWS]
    assert t2.loc[0, "dram_gb"] == 0 and t2.loc[1, "dram_gb"] == pytest.approx(0.5 * ps.model_bytes(TINY).total_bytes / 1e9, rel=0.01)
    t3 = ps.table3(s)
    assert {"Naive", "All"} <= set(t3["method"]) and len(t3) == 7
    assert (ps.fig1_frame(s).groupby("source").size() == 2).all()
    acc = ps.acceptance(t2)
    assert len(acc) == 2 + 2 * 5 and acc["ok"].dtype == bool
    assert acc["ok"].iloc[2:].tolist() == [0.75 <= r <= 1.25 for r in
                                           (t2["io_ms_computed"] / t2["io_ms"]).tolist() * 2]
    cm = ps.table2_costmodel(TINY, tiny["trace"], prof)
    assert cm["method"].tolist() == list(ps.METHOD_NAMES)


def test_compare_traces_puts_the_same_statistics_side_by_side(tiny):
    tr = tiny["trace"]
    same = {"active": tr.active[None], "predicted": tr.predicted[None]}
    cmp = ps.compare_traces(tr, same, k=5)
    ov = cmp["overall"]
    assert np.allclose(ov["synthetic"], ov["measured"])
    assert ov.set_index("statistic").loc["predicted / active", "paper"] == paper.PREDICTED_OVER_ACTIVE
    curve = cmp["curve"]
    assert set(curve["source"]) == {"synthetic", "measured"} and (curve.groupby("source")["s_agg"].is_monotonic_increasing).all()
    assert isinstance(cmp["per_layer"], pd.DataFrame) and len(cmp["per_layer"]) == 2 * TINY.n_layers
