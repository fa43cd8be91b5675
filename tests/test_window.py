"""Sliding window (paper sec 3.1, Fig 4): hand-worked load/evict scenarios and s_agg(k) known answers."""
import numpy as np
import pytest
import torch

from flashlib.window import SlidingWindow, aggregated_usage_curve, as_mask, resident_sizes, window_capacity


def run(k, d, tokens):
    """Feed ``tokens`` (lists of ids) and return [(load, evict, resident)] as Python sets."""
    w = SlidingWindow(d, k)
    out = []
    for ids in tokens:
        step = w.update(ids)
        out.append((set(step.load.tolist()), set(step.evict.tolist()), set(w.resident_ids().tolist())))
    return w, out


def test_k1_keeps_only_the_current_token_but_reuses_the_previous_one():
    _, out = run(1, 6, [[0, 1, 2], [2, 3], [2, 3], []])
    assert out == [({0, 1, 2}, set(), {0, 1, 2}),
                   ({3}, {0, 1}, {2, 3}),
                   (set(), set(), {2, 3}),
                   (set(), {2, 3}, set())]


def test_k2_scripted():
    w, out = run(2, 6, [[0, 1], [1, 2], [3], [], [3, 4], [], []])
    assert out == [({0, 1}, set(), {0, 1}),
                   ({2}, set(), {0, 1, 2}),
                   ({3}, {0}, {1, 2, 3}),
                   (set(), {1, 2}, {3}),
                   ({4}, set(), {3, 4}),
                   (set(), set(), {3, 4}),
                   (set(), {3, 4}, set())]
    s = w.stats
    # hits: neuron 1 at t=1 and neuron 3 at t=4; 7 active ids in all
    assert (s.tokens, s.loaded, s.evicted, s.hits, s.peak_resident) == (7, 5, 5, 2, 3)
    assert s.resident_sum == 2 + 3 + 3 + 1 + 2 + 2 + 0
    assert s.hit_rate == pytest.approx(2 / 7)


def test_k3_repeated_neuron_is_not_evicted_while_it_recurs():
    _, out = run(3, 5, [[0], [1], [0], [2], [3], [], [], []])
    assert out == [({0}, set(), {0}),
                   ({1}, set(), {0, 1}),
                   (set(), set(), {0, 1}),          # 0 is already resident: a hit
                   ({2}, set(), {0, 1, 2}),
                   ({3}, {1}, {0, 2, 3}),           # 0 was active at t=2, still inside the window
                   (set(), {0}, {2, 3}),
                   (set(), {2}, {3}),
                   (set(), {3}, set())]


def test_k0_is_no_window_everything_is_reloaded():
    w, out = run(0, 4, [[0, 1], [1, 2], []])
    assert out == [({0, 1}, set(), {0, 1}), ({1, 2}, {0, 1}, {1, 2}), (set(), {1, 2}, set())]
    assert w.stats.hits == 0 and w.stats.loaded == 4


def test_empty_sets_and_input_forms():
    _, out = run(2, 4, [[], [], []])
    assert out == [(set(), set(), set())] * 3
    w1, w2, w3 = SlidingWindow(8, 2), SlidingWindow(8, 2), SlidingWindow(8, 2)
    for ids in ([1, 5], [5, 6, 6], [0]):                 # duplicates in an id list are one neuron
        a = w1.update(ids)
        b = w2.update(as_mask(ids, 8))
        c = w3.update(torch.tensor(ids, dtype=torch.long))
        for s in (b, c):
            assert np.array_equal(a.load, s.load) and np.array_equal(a.evict, s.evict)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        w1.update([8])
    with pytest.raises(ValueError, match="shape"):
        w1.update(np.zeros(7, dtype=bool))
    w1.reset()
    assert w1.n_resident == 0 and w1.stats.tokens == 0


def test_random_trace_resident_is_union_of_last_k():
    rng = np.random.default_rng(0)
    T, d = 60, 50
    masks = rng.random((T, d)) < 0.15
    for k in (1, 2, 4, 7):
        w = SlidingWindow(d, k)
        for t in range(T):
            before = w.resident_mask.copy()
            step = w.update(masks[t])
            union = masks[max(0, t - k + 1): t + 1].any(axis=0)
            assert np.array_equal(w.resident_mask, union)
            assert not before[step.load].any() and before[step.evict].all()
            assert not union[step.evict].any()
            assert step.n_hits == int((masks[t] & before).sum())


def test_s_agg_hand_computed():
    # tokens: {0}, {0,1}, {2}, {0} over d = 4 neurons (worked out in the comments)
    m = np.zeros((4, 4), dtype=bool)
    for t, ids in enumerate([[0], [0, 1], [2], [0]]):
        m[t, ids] = True
    c = aggregated_usage_curve(m, ks=(1, 2, 3, 4))
    # s_agg(1) = (1+2+1+1)/4 tokens/4; s_agg(2): unions 2,3,2; s_agg(3): 3,3; s_agg(4): 3
    assert c.s_agg[0] == pytest.approx([5 / 16, 7 / 12, 3 / 4, 3 / 4])
    # new(1): t=1..3 -> 1,1,1; new(2): t=2,3 -> 1,0; new(3): t=3 -> 0; new(4): no such token
    assert c.new_per_token[0, :3] == pytest.approx([1 / 4, 1 / 8, 0.0])
    assert np.isnan(c.new_per_token[0, 3])
    assert c.peak_resident[0].tolist() == [2, 3, 3, 3]
    # a second layer with a different trace is computed independently
    two = np.stack([m, np.ones_like(m)], axis=1)                      # [T, 2, d]
    c2 = aggregated_usage_curve(two, ks=(1, 2))
    assert c2.s_agg[0] == pytest.approx(c.s_agg[0, :2]) and c2.s_agg[1] == pytest.approx([1, 1])
    assert c2.new_per_token[1] == pytest.approx([0, 0])
    df = c2.to_frame()
    assert list(df.columns) == ["layer", "k", "s_agg", "new_per_token", "peak_resident"] and len(df) == 4


def test_curve_matches_the_window_and_the_sparsity_module():
    from flashlib.sparsity import aggregated_usage
    rng = np.random.default_rng(1)
    T, d = 80, 64
    rate = rng.random(d) ** 3                                         # uneven popularity
    m = rng.random((T, d)) < rate
    ks = (1, 2, 3, 5, 8)
    c = aggregated_usage_curve(torch.from_numpy(m), ks)
    ref = aggregated_usage(torch.from_numpy(m), ks)
    assert c.s_agg[0] == pytest.approx(ref["s_agg"].to_numpy(), rel=1e-6)
    assert c.new_per_token[0] == pytest.approx(ref["new_per_token"].to_numpy(), rel=1e-6)
    for j, k in enumerate(ks):
        w = SlidingWindow(d, k)
        loads = [w.update(m[t]).load.size for t in range(T)]
        assert np.mean(loads[k:]) / d == pytest.approx(c.new_per_token[0, j])
        assert w.stats.peak_resident == c.peak_resident[0, j]
        assert window_capacity(m, k)[0] == c.peak_resident[0, j]
    assert window_capacity(m, 0)[0] == m.sum(axis=1).max()


def test_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="1..T=3"):
        aggregated_usage_curve(np.zeros((3, 5), dtype=bool), ks=(4,))
    with pytest.raises(TypeError, match="boolean"):
        aggregated_usage_curve(np.zeros((3, 5)), ks=(1,))


def test_shrink_to_fit_drops_the_oldest_tokens_and_grows_back():
    w = SlidingWindow(8, 3)
    for ids in ([0, 1], [2], [3, 4]):
        w.update(ids)
    assert set(w.resident_ids().tolist()) == {0, 1, 2, 3, 4}
    dropped = w.shrink_to_fit(3)                       # forget token {0,1}: 3 rows remain
    assert dropped.tolist() == [0, 1] and set(w.resident_ids().tolist()) == {2, 3, 4}
    assert w.shrink_to_fit(3).size == 0                # already fits
    step = w.update([5])                               # the window holds 2 tokens: nothing leaves yet
    assert step.evict.size == 0 and set(w.resident_ids().tolist()) == {2, 3, 4, 5}
    step = w.update([6])                               # back to k = 3 tokens: token {2} leaves
    assert step.evict.tolist() == [2] and set(w.resident_ids().tolist()) == {3, 4, 5, 6}
    assert w.shrink_to_fit(1).tolist() == [3, 4, 5]    # down to the current token alone
    with pytest.raises(ValueError, match="current token alone"):
        w.shrink_to_fit(0)
    assert w.resident_ids().tolist() == [6]            # the failed call changed nothing
    assert w.stats.evicted == 2 + 1 + 3
    assert w.stats.resident_sum == (2 + 3 + 5 - 2) + 4 + 4 - 3   # counts after each shrink


def test_resident_sizes_are_the_distribution_behind_the_peak():
    rng = np.random.default_rng(3)
    m = rng.random((40, 2, 30)) < 0.15
    ks = (1, 3, 5)
    sizes, c = resident_sizes(m, ks), aggregated_usage_curve(m, ks)
    for j, k in enumerate(ks):
        assert sizes[k].shape == (40 - k + 1, 2)
        assert sizes[k].max(axis=0).tolist() == c.peak_resident[:, j].tolist()
        assert np.allclose(sizes[k].mean(axis=0) / 30, c.s_agg[:, j])
        t = 17                                         # one window by hand
        assert sizes[k][t - k + 1].tolist() == m[t - k + 1:t + 1].any(axis=0).sum(axis=1).tolist()
