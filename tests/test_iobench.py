"""Throughput benchmark (paper Fig 2b): grid bookkeeping, fio side by side, device profile."""
import shutil
from dataclasses import replace

import pandas as pd
import pytest

from flashlib import iobench
from flashlib.config import KiB, MiB, IOBenchConfig, iobench_config

TINY = replace(iobench_config(smoke=True), chunk_bytes=(4 * KiB, 64 * KiB), threads=(1, 2),
               file_bytes=4 * MiB, seconds_per_cell=0.03, repeats=2, warmup_seconds=0.02)

FIO_JSON = """fio: note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [ { "jobname" : "flashlib-iobench",
      "read" : { "io_bytes" : 131072000, "bw_bytes" : 131000000, "total_ios" : 32000,
                 "runtime" : 1000 } } ]
}"""


def test_parse_fio_json_known_answer():
    r = iobench.parse_fio_json(FIO_JSON)
    assert r == {"throughput_mbps": 131.0, "reads": 32000, "bytes": 131072000, "seconds": 1.0}


def test_fio_command_matches_our_access_pattern(tmp_path):
    cmd = iobench.fio_command(tmp_path / "f", 16 * KiB, 8, 0.5)
    for flag in ("--rw=randread", "--bs=16384", "--direct=1", "--ioengine=psync", "--numjobs=8",
                 "--iodepth=1", "--thread", "--runtime=500ms", "--readonly"):
        assert flag in cmd


def test_smoke_grid_runs_both_tools_interleaved(tmp_path):
    f = tmp_path / "t.bin"
    raw = iobench.run_grid(TINY, path=f, progress=False)
    tools = ["flashlib", "fio"] if shutil.which("fio") else ["flashlib"]
    assert len(raw) == TINY.repeats * 2 * 2 * len(tools)
    assert sorted(raw.tool.unique()) == sorted(tools)
    assert (raw.throughput_mbps > 0).all()
    ours = raw[raw.tool == "flashlib"]
    assert (ours.bytes == ours.reads * ours.chunk_bytes).all()
    assert set(ours.io_mode) == {"o_direct"}
    assert not f.exists()                                           # keep_file=False
    if len(tools) == 2:                                             # A B, then B A
        first = raw[(raw.chunk_bytes == 4 * KiB) & (raw.threads == 1)].tool.tolist()
        assert first == ["flashlib", "fio", "fio", "flashlib"]
    prof = iobench.summarize(raw)
    assert list(prof.columns) == iobench.PROFILE_COLUMNS
    assert (prof.repeats == TINY.repeats).all() and len(prof) == 4 * len(tools)


def test_without_fio_it_says_so_and_measures_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(iobench.shutil, "which", lambda name: None)
    cfg = replace(TINY, chunk_bytes=(4 * KiB,), threads=(1,), repeats=1, keep_file=True)
    with pytest.warns(RuntimeWarning, match="fio is not installed"):
        raw = iobench.run_grid(cfg, path=tmp_path / "t.bin", progress=False)
    assert raw.tool.tolist() == ["flashlib"]
    assert "not installed" in raw.attrs["fio"]
    assert (tmp_path / "t.bin").exists()


def test_grid_plan_alternates_tools_and_adds_focus_repeats():
    cfg = replace(TINY, chunk_bytes=(4 * KiB, 16 * KiB), threads=(8,), repeats=2,
                  focus_cells=((16 * KiB, 8),), focus_repeats=4)
    plan = iobench.grid_plan(cfg)
    assert [(r, c // KiB) for r, c, _, _ in plan] == [(0, 4), (0, 16), (1, 4), (1, 16), (2, 16),
                                                      (3, 16)]
    focus_orders = [o for r, c, _, o in plan if c == 16 * KiB]
    assert focus_orders == [("fio", "flashlib"), ("flashlib", "fio")] * 2


def test_test_file_is_reused(tmp_path):
    f = iobench.make_test_file(tmp_path / "t.bin", 1 * MiB, progress=False)
    before = f.stat().st_mtime_ns
    iobench.make_test_file(f, 1 * MiB, progress=False)
    assert f.stat().st_mtime_ns == before and f.stat().st_size == MiB


def synthetic_raw():
    rows = []
    for rep, (ours, fio) in enumerate([(90, 100), (100, 100), (200, 150)]):
        for tool, v in (("flashlib", ours), ("fio", fio)):
            rows.append({"repeat": rep, "tool": tool, "chunk_bytes": 16 * KiB, "threads": 8,
                         "throughput_mbps": v, "io_mode": "o_direct"})
    return pd.DataFrame(rows)


def test_summarize_known_answer():
    prof = iobench.summarize(synthetic_raw())
    ours = prof[prof.tool == "flashlib"].iloc[0]
    assert (ours.throughput_mbps, ours.throughput_mbps_min, ours.throughput_mbps_max,
            ours.repeats) == (100, 90, 200, 3)


def test_ratio_table_known_answer():
    raw = synthetic_raw()
    t = iobench.ratio_table(iobench.summarize(raw), raw, chunks=(16 * KiB, 32 * KiB), threads=(8,))
    row = t.iloc[0]
    assert (row.chunk, row.ours_mbps, row.fio_mbps, row.ours_over_fio) == ("16K", 100, 100, 1.0)
    assert row.paired_ratio_median == pytest.approx(1.0)            # 0.9, 1.0, 1.33
    assert bool(row.meets_90pct)
    assert len(t) == 1                                              # 32 KiB: not in the grid


def test_plot_and_paper_rows():
    raw = synthetic_raw()
    prof = iobench.summarize(raw)
    fig = iobench.plot_throughput(prof)
    assert len(fig.axes) == 2
    rows = iobench.paper_rows(prof)
    assert all(len(r) == 4 for r in rows)
    assert any("not in grid" in r[2] for r in rows)                 # 8 KiB was not measured


def test_presets():
    assert iobench_config(smoke=True).file_bytes < iobench_config(smoke=False).file_bytes
    full = IOBenchConfig()
    assert full.repeats >= 3 and 32 * KiB in full.chunk_bytes and 32 in full.threads
