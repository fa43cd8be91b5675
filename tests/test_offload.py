"""Baselines beyond the paper: cgroup memory groups, the mmap page-cache worker, accelerate disk offload."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flashlib import offload as ol
from flashlib.models import load_model, relu_opt_dir
from flashlib.config import RELU_OPT_PRESETS

NO_CGROUP = ol.cgroup_unavailable_reason()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"cgroup-v1 memory groups unavailable: {NO_CGROUP}")
MiB = 1 << 20
NEW = 5


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A private copy of the smoke checkpoint (no other process maps it), the dense model and its greedy tokens."""
    src = relu_opt_dir(RELU_OPT_PRESETS["smoke"], progress=False)
    folder = ol.private_checkpoint(src, tmp_path_factory.mktemp("ckpt"))
    model, tok = load_model("relu-opt-smoke", progress=False)
    ids = tok("Once upon a time there was", return_tensors="pt")["input_ids"]
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=tok.eos_token_id)
    return folder, ids, dense


# --- cgroup helper ------------------------------------------------------------------------------

@needs_cgroup
def test_group_is_created_limited_reported_and_removed():
    with ol.MemoryGroup(64 * MiB, "test") as g:
        assert g.path.is_dir() and g.path.parent == ol.own_memory_cgroup()
        assert g.read("limit_in_bytes") == 64 * MiB
        p = subprocess.run([sys.executable, "-c", "b = b'x' * (16 << 20); print(len(b))"], preexec_fn=g.enter,
                           capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == str(16 << 20)
        rep = g.report()
        assert 16 * MiB <= rep["max_usage_bytes"] <= 64 * MiB        # the 16 MiB string was charged here
        assert rep["limit_bytes"] == 64 * MiB and rep["oom_kill"] == 0
    assert not g.path.exists()


@needs_cgroup
def test_page_cache_is_capped_by_the_limit_and_reclaim_is_counted(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(np.random.default_rng(0).bytes(64 * MiB))
    assert ol.evict_files([f]) == 0.0
    read = f"f = open({str(f)!r}, 'rb')\nwhile f.read(1 << 20): pass"
    run = ol.run_in_group([sys.executable, "-c", read], 32 * MiB, name="test-cache", poll_seconds=0.01)
    assert run.returncode == 0
    assert run.group["max_usage_bytes"] <= 32 * MiB                 # 64 MiB went through a 32 MiB group
    assert run.group["failcnt"] > 0 and run.group["oom_kill"] == 0   # by reclaiming page cache, not killing
    assert ol.files_resident([f]) < 0.6


@needs_cgroup
def test_anonymous_memory_over_the_limit_is_killed():
    run = ol.run_in_group([sys.executable, "-c", "b = b'x' * (256 << 20)"], 64 * MiB, name="test-oom")
    assert run.returncode == -9 and run.group["oom_kill"] >= 1 and run.result is None


def test_unavailable_cgroups_are_a_clear_skip_reason(monkeypatch):
    monkeypatch.setattr(ol, "memory_mount", lambda: (_ for _ in ()).throw(ol.CgroupUnavailable("no v1")))
    assert ol.cgroup_unavailable_reason() == "no v1"


# --- mmap loading and eviction -------------------------------------------------------------------

def test_lazy_mapping_reads_nothing_until_touched_and_equals_the_file(smoke):
    folder, _, _ = smoke
    f = ol.checkpoint_files(folder)[0]
    assert ol.evict_files([f]) == 0.0
    lazy = ol.lazy_safetensors(f)
    assert ol.files_resident([f]) < 0.1                               # at most the header page
    ref = load_file(str(f))                                           # safetensors itself: populates
    assert lazy.keys() == ref.keys() and all(torch.equal(lazy[k], ref[k]) for k in ref)
    assert ol._in_file_mapping(next(iter(lazy.values())), f)
    del ref
    assert ol.evict_files([f]) == 0.0                                 # our own mapped pages are dropped too


def test_mmap_model_generates_like_the_dense_model(smoke):
    folder, ids, dense = smoke
    model, files = ol.mmap_model(folder)
    runner = ol.HookedRunner(model, files)
    r = runner.generate(ids, max_new_tokens=NEW)
    assert torch.equal(r.tokens, dense)
    assert runner.resident_at_start == 0.0                            # started cold
    assert r.stats["bytes_read"].sum() > 0                            # and read its weights from disk


def test_pagecache_worker_output_parses_and_equals_dense(smoke, tmp_path):
    folder, ids, dense = smoke
    folder = ol.private_checkpoint(folder, tmp_path)        # pages mapped by this test process cannot be evicted
    cmd = ol.worker_command("pagecache", model="relu-opt-smoke", folder=folder, prompt_ids=ids[0].tolist(),
                            new_tokens=NEW, threads=1, reset_peak=False)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [l for l in p.stdout.splitlines() if l.startswith(ol.RESULT_MARK)][-1]
    res = json.loads(line[len(ol.RESULT_MARK):])
    assert res["tokens"] == dense[0].tolist()
    steps = pd.DataFrame(res["steps"])
    assert list(steps["phase"]) == ["prefill"] + ["decode"] * (NEW - 1)
    assert (steps["total_ms"] > 0).all() and res["resident_at_start"] == 0.0 and res["disk_read_bytes"] > 0


def test_accelerate_disk_offload_generates_like_the_dense_model(smoke, tmp_path):
    folder, ids, dense = smoke
    size = sum(os.path.getsize(f) for f in ol.checkpoint_files(folder))
    model, placement = ol.accelerate_model(folder, size // 2, tmp_path / "offload")
    assert placement["disk_bytes"] > 0                                # half the model cannot all stay in "cpu"
    assert placement["cpu_bytes"] + placement["disk_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    r = ol.HookedRunner(model, ol.checkpoint_files(folder)).generate(ids, max_new_tokens=NEW)
    assert torch.equal(r.tokens, dense)


def test_materialize_copies_mapped_weights_once_keeping_ties(smoke):
    folder, ids, dense = smoke
    model, files = ol.mmap_model(folder)
    emb = model.get_input_embeddings().weight
    copied = ol.materialize(model)
    assert copied == sum(os.path.getsize(f) for f in files) - 8 - int.from_bytes(open(files[0], "rb").read(8), "little")
    assert not ol._in_file_mapping(emb, files[0])
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# --- tables --------------------------------------------------------------------------------------

def _fake_result():
    steps = pd.DataFrame({"method": ["flashlib"] * 3 + ["pagecache"] * 3,
                          "phase": ["prefill", "decode", "decode"] * 2,
                          "total_ms": [50, 2.0, 4.0, 90, 10.0, 14.0], "bytes_read": [0, 100, 300, 0, 1000, 3000]})
    runs = pd.DataFrame({"method": ["flashlib", "pagecache", "accelerate@0.5"],
                         "base_method": ["flashlib", "pagecache", "accelerate"], "rep": [0, 0, 0],
                         "status": ["ok", "ok", "OOM-killed under the limit (rc -9)"], "limit_bytes": [None, 300e6, 295e6],
                         "overhead_bytes": [None, 290e6, 290e6], "budget_bytes": [10e6, 10e6, 5e6],
                         "peak_bytes": [305e6, 300e6, 295e6], "cache_at_peak": [0.1e6, 9e6, None],
                         "failcnt": [0, 42, 99], "oom_kill": [0, 0, 1], "tokens": [[1, 2, 3], [1, 2, 3], None]})
    return ol.OffloadResult(steps, runs, pd.DataFrame(), pd.DataFrame(), {})


def test_summary_takes_decode_medians_and_flashlib_speedup():
    s = ol.summarize(_fake_result()).set_index("method")
    assert s.loc["flashlib", "ms_per_token_median"] == 3.0 and s.loc["pagecache", "ms_per_token_median"] == 12.0
    assert s.loc["pagecache", "flashlib_speedup"] == 4.0 and s.loc["pagecache", "failcnt_min"] == 42
    assert s.loc["pagecache", "read_mb_per_token"] == pytest.approx(2000 / 1e6)
    assert s.loc["pagecache", "limit_mb"] == 300 and s.loc["flashlib", "tokens"] == 2
    assert s.loc["accelerate@0.5", "status"].startswith("OOM") and np.isnan(s.loc["accelerate@0.5", "ms_per_token_median"])
    assert s.loc["accelerate@0.5", "oom_kills"] == 1 and s.loc["pagecache", "status"] == "ok"
    assert ol.same_tokens(_fake_result())["same_as_pagecache"].all()


def test_private_checkpoint_copies_only_what_the_workers_need(smoke, tmp_path):
    folder, _, _ = smoke
    dest = ol.private_checkpoint(folder, tmp_path / "copy")
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ol.checkpoint_files(tmp_path)


def test_checkpoint_bytes_are_the_engines_model_bytes(smoke):
    from flashlib.engine import unique_parameters
    folder, _, _ = smoke
    model, _ = load_model("relu-opt-smoke", progress=False)
    params = sum(p.numel() * p.element_size() for _, p in unique_parameters(model))
    files = ol.checkpoint_files(folder)
    assert ol.checkpoint_tensor_bytes(files) == params < sum(os.path.getsize(f) for f in files)


def test_variants_add_baselines_at_the_paper_fraction():
    from flashlib.config import OffloadConfig
    plan = ol.BenchPlan("m", None, 830, "", 1000, [[1]], 4, None, OffloadConfig(baseline_fractions=(0.5, 0.83)))
    v = ol.variants(plan)
    assert v == {"flashlib": ("flashlib", 830), "pagecache": ("pagecache", 830), "accelerate": ("accelerate", 830),
                 "pagecache@0.5": ("pagecache", 500), "accelerate@0.5": ("accelerate", 500)}


@pytest.fixture(scope="module")
def tiny_geometry():
    """A two-layer 'paper geometry' small enough for a test, both flash files written under build/smoke."""
    from flashlib import paperscale as ps
    from flashlib.config import PaperScaleConfig
    cfg = PaperScaleConfig(folder="test-offload-geometry", n_layers=2, d_model=256, d_ffn=1024, n_heads=4,
                           vocab_size=128, max_positions=64, predictor_rank=8, predictor_rank_sensitive=16,
                           predictor_sensitive_layers=1, flash_preset="compact", n_tokens=32, resident_copies=1,
                           window_k=2, sparse_tokens=2, prompt_tokens=8)
    ps.ensure_flash_files(cfg, smoke=True, progress=False)
    return cfg


def test_paper_scale_workers_run_the_engine_and_the_page_cache(tiny_geometry):
    rows, info = ol.paperscale_engine_rows(tiny_geometry, 0, ("bundling", "naive"))
    d = pd.DataFrame(rows)
    assert sorted(d["method"]) == ["bundling", "bundling", "naive"] and info["io_mode"]
    assert (d.loc[d.method == "naive", "bytes_read"] > d.loc[d.method == "bundling", "bytes_read"].max()).all()
    rows, info = ol.paperscale_pagecache_rows(tiny_geometry, 0, 2)
    assert info["resident_at_start"] == 0.0 and rows[0]["bytes_read"] > 0 and len(rows) == 2


def test_paper_scale_page_cache_pages_in_the_naive_bytes_of_each_layer(tiny_geometry):
    from flashlib import paperscale as ps
    cfg = tiny_geometry
    pc = ol.PaperScalePageCache(cfg)
    standin, ffn = pc.regions(1)
    assert standin.nbytes == ps.nonffn_rows(cfg) * ps.bundle_bytes(cfg)          # the naive row's non-FFN bytes
    ref = ps.ffn_layer(cfg, 1)                                                     # layer 1's bundles: [up | down]
    rows = ffn.view(np.float16).reshape(cfg.d_ffn, 2 * cfg.d_model)
    assert np.array_equal(rows[:, :cfg.d_model], ref["up"]) and np.array_equal(rows[:, cfg.d_model:], ref["down"])
    assert ol.evict_files(list(pc.files.values())) == 0.0
    with torch.inference_mode():
        cold, warm = pc.token(0), pc.token(1)
    assert cold["bytes_read"] >= ffn.nbytes and cold["io_ms"] > 0           # paged in from disk
    assert warm["bytes_read"] == 0 and warm["total_ms"] >= warm["io_ms"]    # nothing limits the cache here
    same = ol.PaperScalePageCache(cfg, same_layer=True)
    assert same.regions(1)[1].ctypes.data == same.regions(0)[1].ctypes.data


@needs_cgroup
def test_a_worker_can_restart_its_groups_peak_after_setup():
    code = ("import json; from flashlib.offload import RESULT_MARK, own_group_usage\n"
            "b = b'x' * (64 << 20); del b\n"                       # setup: a 64 MiB transient
            "setup = own_group_usage(reset=True)\n"
            "c = b'y' * (4 << 20)\n"
            "print(RESULT_MARK + json.dumps(setup))")
    run = ol.run_in_group([sys.executable, "-c", code], None, name="test-reset")
    assert run.returncode == 0, run.stderr_tail
    assert run.result["max_usage_bytes"] - run.group["max_usage_bytes"] > 40 * MiB   # the transient is forgotten


def test_baseline_workers_do_not_load_numba():
    """numba + LLVM (~100 MB of libraries) would count against the page-cache and accelerate workers' limit."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys, flashlib.offload; print('numba' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_cgroup
def test_a_worker_past_its_timeout_is_killed_and_said_so():
    run = ol.run_in_group([sys.executable, "-c", "import time; time.sleep(60)"], 64 * MiB, name="test-timeout",
                          timeout=1.0)
    assert run.timed_out and run.result is None and run.wall_s < 30
    row = ol._run_row("x@0.5", "accelerate", 0, 1, 64 * MiB, 0, run, None, 32)
    assert row["status"].startswith("did not finish 32 tokens")
