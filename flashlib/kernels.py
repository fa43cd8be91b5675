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
never do float arithmetic and bf16/fp16/fp32 rows all copy bit for bit; rows that arrive as fp16
bits for a bf16 or fp32 matrix (paper scale's fp16 flash file) are converted while they are put
(``put_rows_f16``), exactly as torch casts.
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
def matrix_plan(mat, sc, ev, lid, row_of, pointer, num_used):
    """``NeuronMatrix.update``'s bookkeeping, checked and applied in one pass: evict ``ev``, make room
    for ``lid``; returns (new num_used, the row each neuron of ``lid`` goes to), the caller writes
    the new rows there (``put_rows``, ``put_rows_f16``).

    ``mat [capacity, words]`` and ``sc [capacity, n_scalars]`` are integer views of the matrix;
    ``row_of [d_ffn]`` and ``pointer [capacity]`` are its index. A neuron in both ``ev`` and ``lid``
    (leaving and coming back, as with no window) keeps its row. The other new rows fill the
    evicted rows inside the final filled region (lowest first), then append; survivors past the
    new end move into the holes that are left. Returns (-1, ...) with nothing changed unless:
    ``ev`` strictly increasing and resident, ``lid`` strictly increasing and absent or in ``ev``,
    both in [0, d_ffn) and the result within the capacity (the caller then finds the problem;
    it checks the rows' shapes before).
    """
    n0, ne, nl = num_used, ev.size, lid.size
    n1 = n0 - ne + nl
    d_ffn = row_of.size
    dest = np.empty(nl, np.int64)
    if n1 > mat.shape[0]:
        return -1, dest
    leaving = np.zeros(d_ffn, np.bool_)
    for j in range(ne):
        e = ev[j]
        if e < 0 or e >= d_ffn or row_of[e] < 0 or (j and e <= ev[j - 1]):
            return -1, dest
        leaving[e] = True
    for j in range(nl):
        i = lid[j]
        if i < 0 or i >= d_ffn or (j and i <= lid[j - 1]):
            return -1, dest
        if row_of[i] >= 0 and not leaving[i]:
            return -1, dest
    fresh = np.empty(nl, np.int64)                # positions in lid of the neurons not resident
    back = np.empty(nl, np.int64)                 # ... and of those coming back (they keep their row)
    k = nb = 0
    for j in range(nl):
        i = lid[j]
        if row_of[i] >= 0:
            back[nb] = j
            nb += 1
            leaving[i] = False
        else:
            fresh[k] = j
            k += 1
    nl = k
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
        dest[j] = d
        pointer[d] = lid[j]
        row_of[lid[j]] = d
    for t in range(nb):                           # after the moves: where a returning neuron's row is now
        dest[back[t]] = row_of[lid[back[t]]]
    return n1, dest


@njit(cache=True, nogil=True)
def put_rows(mat, sc, dest, rows, rsc):
    """New rows (integer words, the matrix's own dtype) and their scalars into rows ``dest``."""
    for j in range(dest.size):
        mat[dest[j], :] = rows[j, :]
        sc[dest[j], :] = rsc[j, :]


@njit(cache=True, nogil=True, inline="always")
def _f16_bits_to_f32_bits(h):
    """IEEE half -> single, exact, as bits (normal, subnormal, zero, inf and NaN)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        if m == 0:
            return sign
        s = np.uint32(0)
        while (m & np.uint32(0x400)) == 0:        # subnormal: m * 2^-24, normalised
            m <<= np.uint32(1)
            s += np.uint32(1)
        return sign | ((np.uint32(113) - s) << np.uint32(23)) | ((m & np.uint32(0x3FF)) << np.uint32(13))
    if e == 31:
        return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))


@njit(cache=True, nogil=True, inline="always")
def _f32_bits_to_bf16_bits(f):
    """Single -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN), as torch does."""
    if (f & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (f & np.uint32(0x7FFFFF)) != 0:
        return np.uint16((f >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _f16_row_to_bf16(out, row):
    """One row, fp16 bits -> bf16 bits; the arithmetic holds for normal numbers (vectorised here),
    returns whether any value was zero, subnormal, inf or NaN (the caller redoes the row exactly)."""
    bad = np.uint32(0)
    for i in range(row.size):
        h = np.uint32(row[i])
        ex = h & np.uint32(0x7C00)
        bad |= (ex == np.uint32(0)) | (ex == np.uint32(0x7C00))
        w = (h & np.uint32(0x7FFF)) + np.uint32(112 << 10)      # exponent rebased to bf16's bias
        out[i] = np.uint16((h & np.uint32(0x8000)) | ((w + np.uint32(3) + ((w >> np.uint32(3)) & np.uint32(1)))
                                                     >> np.uint32(3)))
    return bad


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _f16_row_to_f32(out, row):
    bad = np.uint32(0)
    for i in range(row.size):
        h = np.uint32(row[i])
        ex = h & np.uint32(0x7C00)
        bad |= (ex == np.uint32(0)) | (ex == np.uint32(0x7C00))
        out[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | (((h & np.uint32(0x7FFF)) + np.uint32(112 << 10))
                                                             << np.uint32(13))
    return bad


@njit(cache=True, nogil=True)
def put_rows_f16(mat, sc, dest, rows16, rsc, to_bf16):
    """New rows given as fp16 bits (the flash file's, ``rows16 [n, width]`` uint16) into rows ``dest``
    of a bf16 (``mat`` uint16) or fp32 (``mat`` uint32) matrix, converted exactly as torch casts
    (fp16 -> fp32 exact, -> bf16 round to nearest even), in one pass over each row: 2.5 us per
    16 KiB row here, against 6.2 us for a torch cast into a buffer and a copy (measured)."""
    for j in range(dest.size):
        out, row = mat[dest[j]], rows16[j]
        if to_bf16:
            if _f16_row_to_bf16(out, row):
                for i in range(row.size):
                    out[i] = _f32_bits_to_bf16_bits(_f16_bits_to_f32_bits(row[i]))
        elif _f16_row_to_f32(out, row):
            for i in range(row.size):
                out[i] = _f16_bits_to_f32_bits(row[i])
        sc[dest[j], :] = rsc[j, :]
