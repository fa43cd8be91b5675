"""Synthetic paper-scale traces: calibration at smoke size, the generator's pieces, statistics on known traces."""
import dataclasses

import numpy as np
import pytest
import torch

from flashlib import paper
from flashlib.config import TRACE_PRESETS, trace_config
from flashlib.traces import (calibration_report, closest_friend_shares, generate_trace,
                             layer_active_share, neuron_rates, population_friend_shares,
                             prediction_statistics, trace_statistics)


@pytest.fixture(scope="module")
def smoke_trace():
    return generate_trace(trace_config(), progress=False)     # the test session is in smoke mode


def test_smoke_trace_hits_its_calibration_targets(smoke_trace):
    rep = calibration_report(smoke_trace)
    checked = rep[rep["kind"] != "info"]
    assert len(checked) >= 10
    bad = checked[~checked["ok"].astype(bool)]
    assert bad.empty, f"off target:\n{bad.to_string()}"
    assert {"statistic", "target", "achieved", "tolerance", "ok"} <= set(rep.columns)


def test_trace_shapes_dtypes_and_determinism(smoke_trace):
    cfg = smoke_trace.config
    assert cfg == TRACE_PRESETS["smoke"]
    shape = (cfg.n_tokens, cfg.n_layers, cfg.d_ffn)
    assert smoke_trace.active.shape == shape and smoke_trace.active.dtype == np.bool_
    assert smoke_trace.predicted.shape == shape and smoke_trace.predicted.dtype == np.bool_
    small = dataclasses.replace(cfg, n_tokens=16)
    a, b = generate_trace(small, progress=False), generate_trace(small, progress=False)
    assert np.array_equal(a.active, b.active) and np.array_equal(a.predicted, b.predicted)
    c = generate_trace(dataclasses.replace(small, seed=1), progress=False)
    assert not np.array_equal(a.active, c.active)


def test_layer_shares_follow_table6():
    s = layer_active_share(32)
    for layer, pct in paper.TABLE6_ACTIVE_PCT.items():
        assert s[layer - 1] == pytest.approx(pct / 100)
    assert s.mean() == pytest.approx(paper.TABLE6_MEAN_ACTIVE_PCT / 100)
    assert np.all(np.diff(s) > 0)                              # rises from the first to the last layer
    s4 = layer_active_share(4)
    assert s4[0] == pytest.approx(0.0156) and s4[-1] == pytest.approx(0.0536)
    assert s4.mean() == pytest.approx(0.033)


def test_neuron_rates_have_the_asked_mean_and_a_heavy_head():
    cfg = TRACE_PRESETS["paper"]
    r = neuron_rates(16384, 0.0156, cfg)
    assert r.mean() == pytest.approx(0.0156)
    assert r[0] == pytest.approx(cfg.hub_top_rate) and np.all(np.diff(r) <= 0)
    assert r[:cfg.n_hubs].sum() > 100 * r[-cfg.n_hubs:].sum()
    with pytest.raises(ValueError, match="hubs"):
        neuron_rates(64, 0.01, cfg)                              # 8 hubs alone exceed 1% of 64


def test_prediction_statistics_known_answer():
    act = np.array([[1, 1, 0, 0, 0, 0]], dtype=bool)
    pred = np.array([[1, 0, 1, 1, 0, 0]], dtype=bool)
    s = prediction_statistics(act, pred)
    assert s == pytest.approx({"fn_rate": 0.5, "fp_rate": 0.5, "predicted_share": 0.5,
                               "predicted_over_active": 1.5})


def test_trace_statistics_on_any_trace_shape():
    rng = np.random.default_rng(0)
    m = rng.random((40, 3, 32)) < 0.2
    st = trace_statistics(torch.from_numpy(m), ks=(1, 2, 5))
    assert st.active_share == pytest.approx(m.mean(axis=(0, 2)))
    one = trace_statistics(m[:, 1], ks=(1, 2, 5))
    assert one.curve.s_agg[0] == pytest.approx(st.curve.s_agg[1])
    df = st.per_layer()
    assert list(df.columns) == ["layer", "active_share", "s_agg_k1", "new_k1", "s_agg_k2", "new_k2",
                                "s_agg_k5", "new_k5"]
    assert st.overall(5)["s_agg"] == pytest.approx(st.curve.s_agg[:, 2].mean())


def test_closest_friend_shares_known_answer():
    # neuron 0 fires always, 1 on even tokens, 2 on tokens 0, 4; 3 never
    m = np.zeros((8, 4), dtype=bool)
    m[:, 0] = True
    m[::2, 1] = True
    m[[0, 4], 2] = True
    got = closest_friend_shares(m, friends=(1, 2), sample=10, min_activations=2)
    # neuron 0: friends 1 (4/8), 2 (2/8); neuron 1: 0 (4/4), 2 (2/4); neuron 2: 0 (2/2), 1 (2/2)
    assert got == pytest.approx([(0.5 + 1 + 1) / 3, (0.25 + 0.5 + 1) / 3])
    # independent neurons: the j-th closest friend is the j-th most popular other neuron
    r = np.array([[0.9, 0.5, 0.1, 0.1]])
    assert population_friend_shares(r, (1, 2)) == pytest.approx([(3 * 0.9 + 0.5) / 4, (2 * 0.5 + 2 * 0.1) / 4])
