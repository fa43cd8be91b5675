"""DRAM neuron matrix (paper sec 3.3, Fig 6): contents against a dict model, budget, FFN equivalence."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashlib.dram import (DramBudget, DramBudgetError, NaiveNeuronMatrix, NeuronMatrix,
                           dram_bytes_moved)


def snapshot(m):
    return (m.num_used, m.used_matrix().clone(), m.used_scalars().clone(),
            m.pointer_array().copy(), m.row_of.copy())


def same(a, b):
    return (a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
            and np.array_equal(a[3], b[3]) and np.array_equal(a[4], b[4]))


def check_against_model(m, model: dict, bias: dict):
    ids = m.resident_ids()
    assert m.num_used == len(model) == ids.size and set(ids.tolist()) == set(model)
    assert np.array_equal(m.row_of[ids], np.arange(m.num_used))       # reverse map is consistent
    assert (m.row_of >= 0).sum() == m.num_used
    if model:
        keys = sorted(model)
        assert torch.equal(m.rows_of(keys), torch.stack([model[i] for i in keys]))
        got_bias = m.scalar("bias")[torch.from_numpy(m.row_of[keys])]
        assert torch.equal(got_bias, torch.stack([bias[i] for i in keys]))
    assert m.bytes_resident == m.num_used * m.bytes_per_row <= m.bytes_capacity


def test_random_insert_delete_against_a_dict_model():
    rng = np.random.default_rng(0)
    d_ffn, d_model, cap = 64, 4, 40
    kw = dict(vector_names=("up", "down"), scalar_names=("bias",), dtype=torch.float32)
    pre, naive = NeuronMatrix(cap, d_model, d_ffn, **kw), NaiveNeuronMatrix(cap, d_model, d_ffn, **kw)
    fused = NeuronMatrix(cap, d_model, d_ffn, **kw)                  # the engine's one-pass update()
    worded = NeuronMatrix(cap, d_model, d_ffn, **kw)                 # update_words from a refilled buffer
    buffer = torch.zeros(20, 2 * d_model)
    buffer_words = worded.words_of(buffer)
    assert buffer_words is not None and np.shares_memory(buffer_words, buffer.numpy())
    fast_calls, real_fast = [], fused._fast_update

    def counting_fast(*args):
        fast_calls.append(real_fast(*args))
        return fast_calls[-1]
    fused._fast_update = counting_fast
    model, bias = {}, {}
    overflows = 0
    for step in range(3000):
        resident = np.array(sorted(model), dtype=np.int64)
        evict = rng.choice(resident, size=rng.integers(0, resident.size + 1), replace=False) \
            if resident.size else resident
        free = np.setdiff1d(np.arange(d_ffn), resident)
        n_load = rng.integers(0, 20)
        load = rng.choice(free, size=min(n_load, free.size), replace=False)
        rows = torch.from_numpy(rng.standard_normal((load.size, 2 * d_model)).astype(np.float32))
        b = torch.from_numpy(rng.standard_normal(load.size).astype(np.float32))
        for m in (pre, naive):
            m.delete(evict)
        if step % 7 == 3 and load.size and evict.size:              # a neuron leaving and coming back
            load[0] = evict[0]
            rows[0] = model[int(evict[0])]
        if step % 2:                                                # sorted ids: the compiled path
            order = np.argsort(load)
            evict, load, rows, b = np.sort(evict), load[order], rows[order], b[order]
        if resident.size - evict.size + load.size > cap:
            before = snapshot(fused)
            with pytest.raises(DramBudgetError, match="over capacity"):
                fused.update(evict, load, rows, {"bias": b})
            assert same(before, snapshot(fused))
            before = snapshot(worded)
            buffer[:load.size] = rows
            with pytest.raises(DramBudgetError, match="over capacity"):
                worded.update_words(evict, load, buffer_words[:load.size], {"bias": b.numpy()})
            assert same(before, snapshot(worded))
            for m in (pre, naive):
                before = snapshot(m)
                with pytest.raises(DramBudgetError, match="over capacity"):
                    m.insert(load, rows, {"bias": b})
                assert same(before, snapshot(m))                       # nothing modified
            overflows += 1
            load, rows, b = load[:0], rows[:0], b[:0]
        for m in (pre, naive):
            m.insert(load, rows, {"bias": b})
        fused.update(evict, load, rows, {"bias": b.numpy() if step % 4 == 1 else b})   # numpy or torch
        buffer[:load.size] = rows                                     # unsorted ids: the general path
        worded.update_words(evict, load, buffer_words[:load.size], {"bias": b.numpy()})
        for i in evict.tolist():
            del model[i], bias[i]
        for j, i in enumerate(load.tolist()):
            model[i], bias[i] = rows[j], b[j]
        if step % 10 == 0 or step > 2990:
            check_against_model(pre, model, bias)
            check_against_model(naive, model, bias)
            check_against_model(fused, model, bias)
            check_against_model(worded, model, bias)
    assert overflows > 50                                             # the overflow path was exercised
    assert sum(fast_calls) > 1000                                     # and the compiled one


def test_words_of_only_views_what_it_can_share():
    m = NeuronMatrix(4, 2, 8, dtype=torch.float32)
    assert m.words_of(torch.zeros(3, 4, dtype=torch.float64)) is None          # another dtype
    assert m.words_of(torch.zeros(3, 5)) is None                               # another width
    assert m.words_of(torch.zeros(3, 6)[:, 1:5]) is None                       # rows not word-aligned
    with pytest.raises(TypeError, match="words_of"):
        m.update_words(np.zeros(0, np.int64), np.array([1]), np.ones((1, 4), np.float32))
    assert m.num_used == 0


def test_delete_moves_at_most_one_row_per_eviction():
    m = NeuronMatrix(10, 2, 20, dtype=torch.float32)
    ids = np.arange(10)
    m.insert(ids, torch.arange(40, dtype=torch.float32).reshape(10, 4))
    assert m.delete([8, 9]) == 0            # evicting the last rows moves nothing
    assert m.delete([0, 7]) == 1            # row 7 is now the last: only row 6 moves into row 0
    assert m.resident_ids().tolist() == [6, 1, 2, 3, 4, 5]
    assert m.vector("up")[0].tolist() == [24.0, 25.0] and m.vector("down")[0].tolist() == [26.0, 27.0]
    assert dram_bytes_moved(10, 2, 3, 100) == (2 + 3) * 100
    assert dram_bytes_moved(10, 2, 3, 100, naive=True) == (2 * 8 + 3) * 100


def test_bad_requests_change_nothing():
    m = NeuronMatrix(4, 2, 8, scalar_names=("bias",), dtype=torch.float32)
    m.insert([1, 2], torch.ones(2, 4), {"bias": torch.zeros(2)})
    before = snapshot(m)
    with pytest.raises(ValueError, match="already resident"):
        m.insert([2, 3], torch.ones(2, 4), {"bias": torch.zeros(2)})
    with pytest.raises(KeyError, match="not resident"):
        m.delete([1, 5])
    with pytest.raises(ValueError, match="duplicates"):
        m.delete([1, 1])
    with pytest.raises(ValueError, match="expected shape"):
        m.insert([3], torch.ones(2, 4), {"bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="scalars"):
        m.insert([3], torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        m.insert([8], torch.ones(1, 4), {"bias": torch.zeros(1)})
    assert same(before, snapshot(m))
    with pytest.raises(ValueError, match="already resident"):
        m.update([1], [2, 3], torch.ones(2, 4), {"bias": torch.zeros(2)})     # 2 stays and is loaded again
    with pytest.raises(DramBudgetError, match="over capacity"):
        m.update([1], [1, 3, 4, 5], torch.ones(4, 4), {"bias": torch.zeros(4)})
    assert same(before, snapshot(m))


def test_update_fills_holes_with_the_loaded_rows():
    def ids(*v):                                              # sorted int64 arrays: the one-pass path
        return np.array(v, dtype=np.int64)
    m = NeuronMatrix(6, 1, 20, dtype=torch.float32)
    m.insert(np.arange(5), torch.arange(10, dtype=torch.float32).reshape(5, 2))
    m.update(ids(1, 3), ids(10), torch.tensor([[50.0, 51.0]]))      # 10 takes row 1, row 4 moves into row 3
    assert m.resident_ids().tolist() == [0, 10, 2, 4]
    assert m.rows_of([10, 4]).tolist() == [[50.0, 51.0], [8.0, 9.0]]
    m.update(ids(0), ids(11, 12), torch.tensor([[60.0, 61.0], [70.0, 71.0]]))   # hole, then appended
    assert m.resident_ids().tolist() == [11, 10, 2, 4, 12]


def test_budget_on_the_matrix():
    per_row = (2 * 16 + 1) * 2                                        # fp16 up+down+bias
    with pytest.raises(DramBudgetError, match="at most 3 rows fit"):
        NeuronMatrix(4, 16, 32, scalar_names=("bias",), budget_bytes=3 * per_row + 1)
    m = NeuronMatrix.from_budget(3 * per_row + 1, 16, 32, scalar_names=("bias",))
    assert (m.capacity, m.bytes_per_row, m.bytes_capacity) == (3, per_row, 3 * per_row)
    buf = np.ones((3, 32), dtype=np.float16)                          # like a view of the store's buffer
    m.insert([4, 5, 6], buf, {"bias": np.zeros(3, dtype=np.float16)})
    assert m.bytes_resident == 3 * per_row and m.matrix.dtype == torch.float16
    with pytest.raises(DramBudgetError):
        m.insert([7], buf[:1], {"bias": np.zeros(1, dtype=np.float16)})


@pytest.mark.parametrize("cls", [NeuronMatrix, NaiveNeuronMatrix])
def test_ffn_from_the_matrix_equals_the_dense_ffn(cls):
    torch.manual_seed(0)
    d_model, d_ffn = 8, 24
    x = torch.randn(3, d_model)
    # OPT: relu(x W1^T + b1) W2^T + b2; rows are fc1.weight rows and fc2.weight columns
    w1, b1, w2, b2 = torch.randn(d_ffn, d_model), torch.randn(d_ffn), torch.randn(d_model, d_ffn), torch.randn(d_model)
    dense = F.relu(x @ w1.T + b1) @ w2.T + b2
    m = cls(d_ffn, d_model, d_ffn, ("up", "down"), ("bias",), dtype=torch.float32)
    order = torch.randperm(d_ffn)                                     # row order must not matter
    m.insert(order[:10], torch.cat([w1, w2.T], 1)[order[:10]], {"bias": b1[order[:10]]})
    m.insert(order[10:], torch.cat([w1, w2.T], 1)[order[10:]], {"bias": b1[order[10:]]})
    assert torch.allclose(m.ffn(x, output_bias=b2), dense, atol=1e-4)
    # removing neurons that are inactive for every row of x leaves the output unchanged
    dead = torch.nonzero((x @ w1.T + b1 <= 0).all(0)).flatten()
    m.delete(dead)
    assert torch.allclose(m.ffn(x, output_bias=b2), dense, atol=1e-4)
    # Llama: silu(x G^T) * (x U^T) D^T
    g, u, dn = torch.randn(d_ffn, d_model), torch.randn(d_ffn, d_model), torch.randn(d_model, d_ffn)
    dense = (F.silu(x @ g.T) * (x @ u.T)) @ dn.T
    m = cls(d_ffn, d_model, d_ffn, ("gate", "up", "down"), dtype=torch.float32)
    m.insert(order, torch.cat([g, u, dn.T], 1)[order])
    assert torch.allclose(m.ffn(x, act=F.silu), dense, atol=1e-4)
    # `only`: the sum over a chosen subset of resident neurons
    sub = order[:7]
    dense_sub = (F.silu(x @ g[sub].T) * (x @ u[sub].T)) @ dn[:, sub].T
    assert torch.allclose(m.ffn(x, act=F.silu, only=sub), dense_sub, atol=1e-4)
    m.delete(order[7:9])
    with pytest.raises(KeyError, match="not resident"):
        m.ffn(x, act=F.silu, only=order[:9])


def test_dram_budget_accountant():
    b = DramBudget(1000)
    b.add_resident("attention", 300)
    b.add_resident("embeddings", 100)
    with pytest.raises(DramBudgetError, match="minimum budget is 1100"):
        b.add_resident("predictors", 700)
    with pytest.raises(DramBudgetError, match="minimum budget is 1390"):
        b.reserve_matrices([40, 30, 40], bytes_per_row=9)            # 400 resident + 110 rows x 9 B
    assert b.matrix_bytes == 0                                        # all or nothing
    assert b.rows_that_fit(bytes_per_row=10, n_layers=3) == 20
    b.reserve_matrices([20, 20, 20], bytes_per_row=10)
    assert (b.used_bytes, b.free_bytes) == (1000, 0)
    rep = b.report()
    assert rep["part"].tolist() == ["attention", "embeddings", "neuron matrices", "total"]
    assert rep["bytes"].tolist() == [300, 100, 600, 1000]


def test_capacity_for_window():
    from flashlib.dram import capacity_for_window
    assert capacity_for_window(100, 1000, margin=0.1) == 110
    assert capacity_for_window(990, 1000, margin=0.1) == 1000


def test_window_drives_the_matrix_within_the_sized_capacity():
    """The engine's per-token loop: window -> evict/load -> matrix, sized by window_capacity."""
    from flashlib.window import SlidingWindow, window_capacity
    rng = np.random.default_rng(3)
    T, d_ffn, d_model, k = 50, 128, 4, 3
    masks = rng.random((T, d_ffn)) < rng.random(d_ffn) * 0.2
    bundles = torch.from_numpy(rng.standard_normal((d_ffn, 2 * d_model)).astype(np.float32))
    m = NeuronMatrix(int(window_capacity(masks, k)[0]), d_model, d_ffn, dtype=torch.float32)
    w = SlidingWindow(d_ffn, k)
    for t in range(T):
        step = w.update(masks[t])
        m.update(step.evict, step.load, bundles[step.load])
        assert set(m.resident_ids().tolist()) == set(w.resident_ids().tolist())
        assert torch.equal(m.rows_of(np.flatnonzero(masks[t])), bundles[masks[t]])
    assert m.num_used <= m.capacity


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp16_rows_are_converted_as_torch_casts_while_they_are_put(dtype):
    """Every fp16 value (zeros, subnormals, infinities, NaN included) -> bf16 / fp32 exactly as ``.to`` does."""
    width = 256                                          # 65536 values = 256 rows of 256
    bits = np.arange(65536, dtype=np.uint16).reshape(256, width)
    m = NeuronMatrix(300, width // 2, 1000, ("up", "down"), dtype=dtype)
    ids = np.arange(0, 512, 2, dtype=np.int64)
    m.update_f16(np.zeros(0, np.int64), ids, bits)
    want = torch.from_numpy(bits.view(np.float16)).to(dtype)
    got = m.rows_of(ids)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])
    # a second update: the returning/evicted/new rows behave as update() with the cast rows
    ref = NeuronMatrix(300, width // 2, 1000, ("up", "down"), dtype=dtype)
    ref.update(np.zeros(0, np.int64), ids, want)
    ev, load = ids[:50], np.arange(1, 101, 2, dtype=np.int64)
    new = np.random.default_rng(0).integers(0, 2**16, (load.size, width)).astype(np.uint16) & np.uint16(0x7BFF)
    m.update_f16(ev, load, new)
    ref.update(ev, load, torch.from_numpy(new.view(np.float16)).to(dtype))
    keys = sorted(set(ids.tolist()) - set(ev.tolist()) | set(load.tolist()))
    a, b = m.rows_of(keys), ref.rows_of(keys)
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
    with pytest.raises(ValueError, match="already resident"):          # the same checks as update()
        m.update_f16(np.zeros(0, np.int64), load[:1], new[:1])
