"""Cost model (paper sec 3.1, Table 2): the paper's table from its own inputs, device profiles."""
import math

import numpy as np
import pandas as pd
import pytest

from flashlib import paper
from flashlib.costmodel import (GB, ActivationStats, DeviceProfile, ModelBytes, ffn_flops,
                                measured_profile, paper_m1max_profile, paper_table2, table2,
                                token_cost)
from flashlib.window import aggregated_usage_curve


def test_paper_table2_every_row_within_3_percent_at_printed_precision():
    df = paper_table2()
    assert len(df) == len(paper.TABLE2_ROWS)
    # flags and throughputs are the paper's
    ref = pd.DataFrame(paper.TABLE2_ROWS, columns=paper.TABLE2_COLUMNS)
    for col in ("hybrid", "predictor", "windowing", "bundling"):
        assert df[col].tolist() == ref[col].tolist()
    assert df["throughput_gbps"].to_numpy() == pytest.approx(ref["throughput_gbps"].to_numpy())
    # Flash->DRAM GB at the paper's one decimal, and the I/O latency column: within 3%
    assert df["flash_gb_printed"].to_numpy() == pytest.approx(ref["flash_to_dram_gb"].to_numpy(), rel=0.03)
    assert df["io_printed_rel_err"].abs().max() < 0.03


def test_paper_table2_unrounded_inputs_and_the_known_mismatches():
    df = paper_table2().set_index(np.arange(5))
    # naive, hybrid and +windowing agree within 3% without any rounding
    assert df.loc[[0, 1, 3], "io_rel_err"].abs().max() < 0.03
    # 10% and 2.4% of the FFN are 0.866 and 0.208 GB; the paper's 738 and 87 ms imply 0.92 and
    # 0.196 GB, so rows 3 and 5 sit ~6% off: a mismatch inside the paper, reported, not hidden
    assert df.loc[2, "flash_to_dram_gb"] == pytest.approx(0.10 * 0.6462 * 13.4)
    assert df.loc[3, "flash_to_dram_gb"] == pytest.approx(0.024 * 0.6462 * 13.4)
    assert df.loc[[2, 4], "io_rel_err"].abs().max() == pytest.approx(0.061, abs=0.005)
    assert df.loc[3, "implied_gb_paper"] != pytest.approx(df.loc[4, "implied_gb_paper"], rel=0.03)
    # DRAM: naive 0, hybrid half, predictor row = non-FFN + predictors (4.9 vs the paper's 4.8)
    assert df.loc[0, "dram_gb"] == 0 and df.loc[1, "dram_gb"] == pytest.approx(6.7)
    assert df.loc[2, "dram_gb"] == pytest.approx(4.8, rel=0.03)


def test_table2_for_any_model_and_device():
    model = ModelBytes("toy", total_bytes=1e9, ffn_share=0.5, predictor_share=0.1, vector_bytes=1024, n_vectors=3)
    act = ActivationStats(predicted_share=0.2, new_share=0.05, window_share=0.3)
    dev = DeviceProfile("flat", {4: ((512, 1e8), (1 << 20, 1e9))}, dense_gbps=2.0)
    df = table2(model, act, dev, dram_fraction=0.5, threads=4)
    assert df["flash_to_dram_gb"].tolist() == pytest.approx([1.0, 0.5, 0.1, 0.025, 0.025])
    assert df["dram_gb"].tolist() == pytest.approx([0, 0.5, 0.6, 0.75, 0.75])
    assert df["chunk_bytes"].tolist()[2:] == [1024, 1024, 3072]
    assert df.loc[0, "io_ms"] == pytest.approx(500.0)
    assert df.loc[4, "io_ms"] == pytest.approx(1e3 * 0.025 / dev.throughput_gbps(3072, 4))
    assert df["fits_budget"].tolist() == [True, True, False, False, False]


def test_profile_interpolates_in_log_chunk_and_threads(tmp_path):
    rows = [("flashlib", c, t, mbps, "direct") for t, scale in ((1, 1.0), (4, 2.0))
            for c, mbps in ((4096, 100 * scale), (65536, 500 * scale), (1 << 20, 1000 * scale))]
    rows.append(("fio", 4096, 1, 9999, "direct"))                     # other tools are ignored
    df = pd.DataFrame(rows, columns=["tool", "chunk_bytes", "threads", "throughput_mbps", "io_mode"])
    path = tmp_path / "tp.csv"
    df.to_csv(path, index=False)
    p = measured_profile(path)
    assert p.thread_counts == [1, 4]
    assert p.throughput_gbps(4096, 1) == pytest.approx(0.1)
    assert p.throughput_gbps(16384, 1) == pytest.approx(0.3)          # halfway in log(chunk)
    assert p.throughput_gbps(1024, 1) == pytest.approx(0.1)           # clamped below
    assert p.throughput_gbps(1 << 30, 4) == pytest.approx(2.0)        # clamped above
    assert p.throughput_gbps(4096, 2) == pytest.approx(0.15)          # halfway in log(threads)
    assert p.throughput_gbps(4096, 32) == pytest.approx(0.2)          # clamped to 4 threads
    assert p.dense_gbps == pytest.approx(2.0) and "direct" in p.note
    assert p.io_ms(2e8, 65536, 1) == pytest.approx(400.0)
    with pytest.raises(FileNotFoundError, match="02_flash_throughput"):
        measured_profile(tmp_path / "missing.csv")


def test_paper_profile_points_and_token_cost():
    p = paper_m1max_profile()
    assert p.throughput_gbps(8192) == pytest.approx(1.25)
    assert p.throughput_gbps(16384) == pytest.approx(2.25)
    assert p.throughput_gbps(1 << 30) == pytest.approx(6.1) and p.dense_gbps == 6.1
    c = token_cost(p, flash_bytes=0.2 * GB, chunk_bytes=16384, dram_bytes_moved=1e6, flops=1e9)
    assert c.io_ms == pytest.approx(1e3 * 0.2 / 2.25)
    assert math.isnan(c.mem_ms) and math.isnan(c.compute_ms)         # the paper gives neither speed
    fast = DeviceProfile("x", p.points, 6.1, memcpy_gbps=10.0, compute_gflops=100.0)
    c = token_cost(fast, 0.0, None, dram_bytes_moved=1e8, flops=ffn_flops(1000, 4096))
    assert (c.io_ms, c.mem_ms) == (0.0, pytest.approx(10.0))
    assert c.compute_ms == pytest.approx(1e3 * 2 * 1000 * 4096 * 2 / 100e9)
    assert c.total_ms == pytest.approx(c.io_ms + c.mem_ms + c.compute_ms)


def test_activation_stats_from_a_trace_curve():
    m = np.zeros((4, 4), dtype=bool)
    for t, ids in enumerate([[0], [0, 1], [2], [0]]):
        m[t, ids] = True
    a = ActivationStats.from_curve(aggregated_usage_curve(m, ks=(1, 2)), k=2)
    assert (a.predicted_share, a.new_share, a.window_share) == pytest.approx((5 / 16, 1 / 8, 7 / 12))
    with pytest.raises(ValueError, match="k=3"):
        ActivationStats.from_curve(aggregated_usage_curve(m, ks=(1, 2)), k=3)
