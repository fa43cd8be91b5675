"""Memory-limited workers and the baselines beyond the paper: cgroup memory groups, the worker protocol
(every method, the engine included, under budget + its measured own memory), accelerate disk offload."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from flashlib import cgroup as cg, offload as ol, workers
from flashlib.config import RELU_OPT_PRESETS
from flashlib.models import load_model, relu_opt_dir

NO_CGROUP = cg.cgroup_unavailable_reason()
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
    with cg.MemoryGroup(64 * MiB, "test") as g:
        assert g.path.is_dir() and g.path.parent == cg.own_memory_cgroup()
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
    assert cg.evict_files([f]) == 0.0
    read = f"f = open({str(f)!r}, 'rb')\nwhile f.read(1 << 20): pass"
    run = cg.run_in_group([sys.executable, "-c", read], 32 * MiB, name="test-cache", poll_seconds=0.01)
    assert run.returncode == 0
    assert run.group["max_usage_bytes"] <= 32 * MiB                 # 64 MiB went through a 32 MiB group
    assert run.group["failcnt"] > 0 and run.group["oom_kill"] == 0   # by reclaiming page cache, not killing
    assert cg.files_resident([f]) < 0.6


@needs_cgroup
def test_anonymous_memory_over_the_limit_is_killed():
    run = cg.run_in_group([sys.executable, "-c", "b = b'x' * (256 << 20)"], 64 * MiB, name="test-oom")
    assert run.returncode == -9 and run.group["oom_kill"] >= 1 and run.result is None


def test_unavailable_cgroups_are_a_clear_skip_reason(monkeypatch):
    monkeypatch.setattr(cg, "memory_mount", lambda: (_ for _ in ()).throw(cg.CgroupUnavailable("no v1")))
    assert cg.cgroup_unavailable_reason() == "no v1"


@needs_cgroup
def test_a_worker_can_restart_its_groups_peak_after_setup():
    code = ("import json; from flashlib.cgroup import RESULT_MARK, own_group_usage\n"
            "b = b'x' * (64 << 20); del b\n"                       # setup: a 64 MiB transient
            "setup = own_group_usage(reset=True)\n"
            "c = b'y' * (4 << 20)\n"
            "print(RESULT_MARK + json.dumps(setup))")
    run = cg.run_in_group([sys.executable, "-c", code], None, name="test-reset")
    assert run.returncode == 0, run.stderr_tail
    assert run.result["max_usage_bytes"] - run.group["max_usage_bytes"] > 40 * MiB   # the transient is forgotten


@needs_cgroup
def test_a_worker_past_its_timeout_is_killed_and_said_so():
    run = cg.run_in_group([sys.executable, "-c", "import time; time.sleep(60)"], 64 * MiB, name="test-timeout",
                          timeout=1.0)
    assert run.timed_out and run.result is None and run.wall_s < 30
    spec = workers.Spec("accelerate", new_tokens=32)
    row = workers._run_row("x@0.5", spec, 0, 1, 64 * MiB, 0, run)
    assert row["status"].startswith("did not finish 32 tokens")


def test_baseline_workers_do_not_load_numba():
    """numba + LLVM (~100 MB of libraries) would count against the page-cache and accelerate workers' limit."""
    out = subprocess.run([sys.executable, "-c", "import sys, flashlib.workers, flashlib.streaming, flashlib.offload; "
                          "print('numba' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the worker protocol ------------------------------------------------------------------------

def test_spec_round_trips_through_its_command_line():
    spec = workers.Spec("bundling", model="paper", budget=123, prompt_ids=(1, 2, 3), dtype="bfloat16",
                        geometry={"n_layers": 2, "dtypes": ("bfloat16",)}, limit_bytes=5 << 20)
    cmd = workers.command(spec)
    assert cmd[1:3] == ["-m", "flashlib.workers"]
    back = workers.Spec.from_json(cmd[3])
    assert back.prompt_ids == (1, 2, 3) and back.limit_bytes == 5 << 20 and back.geometry["n_layers"] == 2
    assert workers.paper_config(back).dtypes == ("bfloat16",)


@needs_cgroup
@pytest.mark.parametrize("method", ["bundling", "pagecache"])
def test_a_limited_worker_sets_its_own_limit_after_setup_and_equals_dense(smoke, method, tmp_path):
    """The engine and the page cache, each in its own group, limited after setup; greedy tokens as dense."""
    _, ids, dense = smoke
    spec = workers.Spec(method, model="relu-opt-smoke", budget="450kB", prompt_ids=tuple(ids[0].tolist()),
                        new_tokens=NEW, flash_root=str(tmp_path))
    free = cg.run_in_group(workers.command(spec), None, name="test-free", timeout=300)
    assert free.result is not None and free.result["status"] == "ok", free.stderr_tail
    held = free.result["weight_bytes"]
    limit = max(int(450e3), held) + max(0, free.group["max_usage_bytes"] - held) + (0 if method == "pagecache" else 16 * MiB)
    code = (f"import json, sys; from flashlib import workers; from flashlib.cgroup import RESULT_MARK, own_memory_cgroup\n"
            f"out = workers.run(workers.Spec.from_json(sys.argv[1]))\n"
            f"out['limit_file'] = int((own_memory_cgroup() / 'memory.limit_in_bytes').read_text())\n"
            f"print(RESULT_MARK + json.dumps(out, default=float))")
    lim = cg.run_in_group([sys.executable, "-c", code, dataclasses.replace(spec, limit_bytes=limit).to_json()],
                          None, name="test-limited", timeout=300)
    res = lim.result
    assert res is not None and res["status"] == "ok", lim.stderr_tail
    # the kernel keeps whole pages; page cache (libraries) fills a group up to its limit, passing it by a page batch
    assert res["limit_file"] == limit // 4096 * 4096 and lim.group["max_usage_bytes"] <= limit + (256 << 10)
    assert lim.group["oom_kill"] == 0
    assert res["tokens"] == dense[0].tolist()
    steps = pd.DataFrame(res["steps"])
    assert list(steps["phase"]) == ["prefill"] + ["decode"] * (NEW - 1)
    if method == "pagecache":
        assert res["resident_at_start"] == 0.0 and res["disk_read_bytes"] > 0 and res["files"]
    else:
        assert res["weight_bytes"] > 0 and res["info"]["window_k"] >= 0 and not res["files"]


def test_a_limit_below_what_a_worker_holds_after_setup_is_a_status_not_a_crash(smoke, tmp_path, monkeypatch):
    _, ids, _ = smoke
    spec = workers.Spec("naive", model="relu-opt-smoke", prompt_ids=tuple(ids[0].tolist()), new_tokens=2,
                        flash_root=str(tmp_path), limit_bytes=1, in_group=False)
    monkeypatch.setattr(workers, "set_own_limit", lambda b: (_ for _ in ()).throw(OSError(16, "Device or resource busy")))
    out = workers.run(spec)
    assert out["status"].startswith("holds more than its limit after setup") and "steps" not in out


def _fake_result():
    steps = pd.DataFrame({"method": ["flashlib"] * 3 + ["pagecache"] * 3,
                          "phase": ["prefill", "decode", "decode"] * 2,
                          "total_ms": [50, 2.0, 4.0, 90, 10.0, 14.0], "bytes_read": [0, 100, 300, 0, 1000, 3000]})
    runs = pd.DataFrame({"method": ["flashlib", "pagecache", "accelerate@0.5"],
                         "base_method": ["bundling", "pagecache", "accelerate"], "dtype": ["float32"] * 3, "rep": [0, 0, 0],
                         "status": ["ok", "ok", "OOM-killed under the limit (rc -9)"], "limit_bytes": [316e6, 300e6, 295e6],
                         "overhead_bytes": [290e6, 290e6, 290e6], "budget_bytes": [10e6, 10e6, 5e6],
                         "weight_bytes": [9e6, 0, None], "peak_bytes": [305e6, 300e6, 295e6],
                         "cache_at_peak": [0.1e6, 9e6, None], "failcnt": [0, 42, 99], "oom_kill": [0, 0, 1],
                         "tokens": [[1, 2, 3], [1, 2, 3], None]})
    return workers.Result(steps, runs, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {})


def test_summary_takes_decode_medians_and_the_speedup_over_a_reference():
    s = workers.summarize(_fake_result(), "flashlib").set_index("method")
    assert s.loc["flashlib", "ms_per_token_median"] == 3.0 and s.loc["pagecache", "ms_per_token_median"] == 12.0
    assert s.loc["pagecache", "flashlib_speedup"] == 4.0 and s.loc["pagecache", "failcnt_min"] == 42
    assert s.loc["pagecache", "read_mb_per_token"] == pytest.approx(2000 / 1e6)
    assert s.loc["pagecache", "limit_mb"] == 300 and s.loc["flashlib", "tokens"] == 2
    assert s.loc["accelerate@0.5", "status"].startswith("OOM") and np.isnan(s.loc["accelerate@0.5", "ms_per_token_median"])
    assert s.loc["accelerate@0.5", "oom_kills"] == 1 and s.loc["pagecache", "status"] == "ok"
    assert workers.same_tokens(_fake_result(), "pagecache")["same_as_pagecache"].all()


# --- accelerate and the checkpoints it loads ----------------------------------------------------------

def test_accelerate_disk_offload_generates_like_the_dense_model(smoke, tmp_path):
    folder, ids, dense = smoke
    size = sum(os.path.getsize(f) for f in ol.checkpoint_files(folder))
    runner = ol.accelerate_runner(folder, size // 2, tmp_path / "offload")
    assert runner.placement["disk_bytes"] > 0                      # half the model cannot all stay in "cpu"
    assert runner.model_bytes == sum(p.numel() * 4 for p in runner.model.parameters())
    r = runner.generate(ids, max_new_tokens=NEW)
    assert torch.equal(r.tokens, dense) and runner.resident_at_start == 0.0


def test_materialize_copies_mapped_weights_once_keeping_ties():
    model, _ = load_model("relu-opt-smoke", progress=False)
    emb = model.get_input_embeddings().weight
    ptr = emb.data_ptr()
    copied = workers.materialize(model)
    assert copied == sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert model.get_input_embeddings().weight.data_ptr() != ptr
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


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
