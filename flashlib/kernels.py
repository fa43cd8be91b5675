"""Compiled per-token bookkeeping of the window and the DRAM matrix (numba, CPU).

The engine's memory management per token and layer is a few dozen ids and a few rows: done
with numpy/torch calls it is ~25 small calls, and between two of them the model's forward
pass evicts the CPU caches, so each call costs 3-5 us cold (measured in the engine: one
``SlidingWindow.update`` 60-70 us cold vs 20-24 us warm). On our 4-layer ReLU OPT that made
memory management ~13 % of a token, over the paper's 8.7 %. These two kernels do the same
work in one compiled call each; ``window.SlidingWindow`` and ``dram.NeuronMatrix`` keep the
same semantics, checked by the tests against hand-computed traces, the brute-force union of
the last k sets (``tests/test_window.py``) and a dict model of the matrix (``tests/test_dram.py``).

Rows are copied as integer words of the dtype's size (``dram._words`` views), so the kernels
never do float arithmetic and bf16/fp16/fp32 rows all copy bit for bit.
Compiled once per machine (``cache=True`` writes next to this file); the first call of a fresh
checkout takes a second or two.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def window_advance(ids, old, drop_old, count, resident):
    """One token of a k >= 1 window. ``ids``: the new token's sorted unique ids; ``old``: the ids
    of the token leaving the window (used when ``drop_old``). Updates ``count`` (uint16
    [d_ffn]) and ``resident`` (bool [d_ffn]) in place; returns (load, evict), both sorted:
    load = ids not resident before, evict = leaving ids that no buffered token uses any more.
    """
    n = ids.size
    load = np.empty(n, np.int64)
    nl = 0
    for j in range(n):
        i = ids[j]
        if not resident[i]:
            load[nl] = i
            nl += 1
        count[i] += 1
    evict = np.empty(old.size, np.int64)
    ne = 0
    if drop_old:
        for j in range(old.size):
            i = old[j]
            count[i] -= 1
            if count[i] == 0:
                evict[ne] = i
                ne += 1
    for j in range(ne):
        resident[evict[j]] = False
    for j in range(nl):
        resident[load[j]] = True
    return load[:nl], evict[:ne]


@njit(cache=True, nogil=True)
def matrix_update(mat, sc, rows, rsc, ev, lid, row_of, pointer, num_used):
    """``NeuronMatrix.update``, checked and applied in one pass: evict ``ev``, insert ``lid``
    with rows ``rows [n, width]`` and scalars ``rsc [n, n_scalars]``.

    ``mat [capacity, width]`` and ``sc [capacity, n_scalars]`` are integer views of the matrix
    (``rows``/``rsc`` of the same word type); ``row_of [d_ffn]`` and ``pointer [capacity]`` are
    its index. A neuron in both ``ev`` and ``lid`` (leaving and coming back, as with no window)
    keeps its row, overwritten in place. The other new rows fill the evicted rows inside the
    final filled region (lowest first), then append; survivors past the new end move into the
    holes that are left. Returns the new ``num_used``, or -1 with nothing changed unless: ``ev``
    strictly increasing and resident, ``lid`` strictly increasing and absent or in ``ev``, both
    in [0, d_ffn), the result within the capacity, and ``rows``/``rsc`` of the right shapes
    (the caller then finds the problem).
    """
    n0, ne, nl = num_used, ev.size, lid.size
    n1 = n0 - ne + nl
    d_ffn = row_of.size
    if n1 > mat.shape[0] or rows.shape[0] != nl or rows.shape[1] != mat.shape[1] \
            or rsc.shape[0] != nl or rsc.shape[1] != sc.shape[1]:
        return -1
    leaving = np.zeros(d_ffn, np.bool_)
    for j in range(ne):
        e = ev[j]
        if e < 0 or e >= d_ffn or row_of[e] < 0 or (j and e <= ev[j - 1]):
            return -1
        leaving[e] = True
    n_back = 0
    for j in range(nl):
        i = lid[j]
        if i < 0 or i >= d_ffn or (j and i <= lid[j - 1]):
            return -1
        if row_of[i] >= 0:
            if not leaving[i]:
                return -1
            n_back += 1
    fresh = np.empty(nl - n_back, np.int64)       # positions in lid/rows of the neurons not resident
    k = 0
    for j in range(nl):
        i = lid[j]
        if row_of[i] >= 0:                        # coming back: overwrite its row, it does not leave
            mat[row_of[i], :] = rows[j, :]
            sc[row_of[i], :] = rsc[j, :]
            leaving[i] = False
        else:
            fresh[k] = j
            k += 1
    nl = fresh.size
    holes = np.empty(ne, np.int64)
    nh = 0
    tail_gone = np.zeros(max(n0 - n1, 0), np.bool_)
    for j in range(ne):
        e = ev[j]
        if leaving[e]:
            r = row_of[e]
            if r < n1:
                holes[nh] = r
                nh += 1
            else:
                tail_gone[r - n1] = True
    holes = np.sort(holes[:nh])
    h = nl
    for r in range(n1, n0):                       # survivors past the new end fill holes[nl:]
        if not tail_gone[r - n1]:
            d = holes[h]
            h += 1
            mat[d, :] = mat[r, :]
            sc[d, :] = sc[r, :]
            p = pointer[r]
            pointer[d] = p
            row_of[p] = d
    for j in range(ne):
        if leaving[ev[j]]:
            row_of[ev[j]] = -1
    for r in range(n1, n0):
        pointer[r] = -1
    for t in range(nl):                           # new rows: holes first, then appended
        j = fresh[t]
        d = holes[t] if t < nh else n0 + (t - nh)
        mat[d, :] = rows[j, :]
        sc[d, :] = rsc[j, :]
        pointer[d] = lid[j]
        row_of[lid[j]] = d
    return n1
