"""Preallocated DRAM neuron matrix and DRAM budget (paper sec 3.3 "optimized data management", Fig 6).

Per layer, one ``NeuronMatrix`` is allocated once at the capacity the window needs (the paper's
Req_i rows): ``matrix [capacity, bundle_width]`` (row r = the bundle of neuron ``pointer[r]``, its
vectors in ``vector_names`` order, e.g. ``[up | down]`` or ``[gate | up | down]``), per-row
scalars (e.g. the up-projection bias), ``num_used`` and the reverse map ``row_of[neuron] -> row``
(or -1). Delete moves rows from the end of the filled region into the holes, O(c * d_model) for c
evictions; insert writes the new bundles at ``num_used ..``; nothing is ever reallocated. Because
the order of the intermediate neurons does not change the FFN output, the compute uses the
filled prefix directly: ``up = matrix[:num_used, d:2d]``, ``down = matrix[:num_used, 2d:3d]``.

``NaiveNeuronMatrix`` has the same interface but rebuilds its tensors every token (the
realloc-and-append baseline of the Fig 6 ablation). ``DramBudget`` sums what stays resident
(attention, embeddings, predictors) and the matrices' capacities, and refuses a configuration
that does not fit, naming the minimum. Timing the memory management is the engine's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .config import DRAM


class DramBudgetError(MemoryError):
    """A matrix or a configuration would exceed its row capacity or byte budget."""


def _ids(neuron_ids, d_ffn: int, what: str) -> np.ndarray:
    """Unique, in-range int64 ids (numpy), or a ValueError naming the problem."""
    a = neuron_ids.detach().cpu().numpy() if hasattr(neuron_ids, "detach") else np.asarray(neuron_ids)
    ids = a.astype(np.int64, copy=False).reshape(-1)
    if ids.size < 2:
        lo = hi = ids[0] if ids.size else 0
    elif (ids[1:] > ids[:-1]).all():          # strictly increasing (the window's ids): unique, ends bound
        lo, hi = ids[0], ids[-1]
    else:
        if np.unique(ids).size != ids.size:
            raise ValueError(f"{what}: neuron ids contain duplicates")
        lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= d_ffn:
        raise ValueError(f"{what}: neuron ids must lie in [0, {d_ffn}), got [{ids.min()}, {ids.max()}]")
    return ids


_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _words(t: torch.Tensor) -> np.ndarray:
    """Numpy view of a CPU tensor's rows as integer words (any dtype, bf16 included), so the
    compiled kernels copy rows bit for bit without float arithmetic. The word is the widest of
    8/4/2/1 bytes that divides a row's bytes (a 16 KiB fp16 bundle copies as 2048 int64s:
    ~4x faster than int16 words, measured), so equal-width tensors get equal views."""
    row_bytes = t.shape[-1] * t.element_size() if t.dim() else t.element_size()
    size = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)
    word = _WORD[size]
    if t.numel() == 0:                                 # empty: a fresh (never written) array
        return np.zeros((*t.shape[:-1], row_bytes // size), dtype=torch.empty(0, dtype=word).numpy().dtype)
    if t.stride(-1) != 1 or any(st * t.element_size() % size for st in t.stride()[:-1]):
        t = t.contiguous()
    return t.detach().view(torch.uint8).view(word).numpy()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _torch_rows(rows, n: int, width: int, what: str) -> torch.Tensor:
    """``rows`` (torch or numpy, e.g. a view of the store's read buffer) as a ``[n, width]`` tensor."""
    t = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
    if tuple(t.shape) != (n, width):
        raise ValueError(f"{what}: expected shape ({n}, {width}), got {tuple(t.shape)}")
    return t


class _MatrixBase:
    """Shared shape bookkeeping, views and FFN compute of both matrix variants."""

    def __init__(self, capacity: int, d_model: int, d_ffn: int, vector_names=("up", "down"),
                 scalar_names=(), dtype=torch.float16, device="cpu", budget_bytes: int | None = None):
        if capacity < 0 or d_model <= 0 or d_ffn <= 0 or not vector_names:
            raise ValueError(f"bad matrix shape: capacity={capacity}, d_model={d_model}, "
                             f"d_ffn={d_ffn}, vector_names={vector_names}")
        self.capacity, self.d_model, self.d_ffn = int(capacity), int(d_model), int(d_ffn)
        self.vector_names, self.scalar_names = tuple(vector_names), tuple(scalar_names)
        self.dtype, self.device = dtype, torch.device(device)
        self.bundle_width = len(self.vector_names) * self.d_model
        self.bytes_per_row = (self.bundle_width + len(self.scalar_names)) * _itemsize(dtype)
        if budget_bytes is not None and self.bytes_capacity > budget_bytes:
            raise DramBudgetError(
                f"neuron matrix of {self.capacity} rows x {self.bytes_per_row} B = {self.bytes_capacity} B "
                f"exceeds its budget of {budget_bytes} B; at most {budget_bytes // self.bytes_per_row} rows fit")
        self.row_of = np.full(self.d_ffn, -1, dtype=np.int64)   # [d_ffn] row of each neuron, -1 = absent
        self.num_used = 0

    # --- bytes (weights and per-row scalars; the index arrays are reported apart) ---
    @property
    def bytes_capacity(self) -> int:
        return self.capacity * self.bytes_per_row

    @property
    def bytes_resident(self) -> int:
        return self.num_used * self.bytes_per_row

    @property
    def bytes_index(self) -> int:
        """pointer + reverse map, bookkeeping outside the model's bytes."""
        return 8 * (self.capacity + self.d_ffn)

    # --- contents ---
    def resident_ids(self) -> np.ndarray:
        """Neuron ids in row order ``[num_used]`` (a copy of pointer[:num_used])."""
        return self.pointer_array()[: self.num_used].copy()

    def contains(self, neuron_ids) -> np.ndarray:
        return self.row_of[np.asarray(neuron_ids, dtype=np.int64)] >= 0

    def rows_of(self, neuron_ids) -> torch.Tensor:
        """Bundles of resident neurons ``[n, bundle_width]`` (KeyError if one is absent)."""
        r = self.row_of[np.asarray(neuron_ids, dtype=np.int64).reshape(-1)]
        if (r < 0).any():
            raise KeyError(f"neurons not resident: {np.asarray(neuron_ids).reshape(-1)[r < 0][:10].tolist()}")
        return self.used_matrix()[torch.from_numpy(r)]

    def vector(self, name: str) -> torch.Tensor:
        """``[num_used, d_model]`` view of one vector of every resident bundle, e.g. "up"."""
        i = self.vector_names.index(name)
        return self.used_matrix()[:, i * self.d_model:(i + 1) * self.d_model]

    def scalar(self, name: str) -> torch.Tensor:
        """``[num_used]`` view of one per-row scalar, e.g. "bias"."""
        return self.used_scalars()[:, self.scalar_names.index(name)]

    def ffn(self, x: torch.Tensor, act=torch.relu, output_bias: torch.Tensor | None = None,
            only=None) -> torch.Tensor:
        """FFN output of the resident neurons, ``x [..., d_model] -> [..., d_model]``, in the matrix dtype.

        Ungated (opt): ``act(x @ up.T + bias) @ down``; gated (llama, "gate" in vector_names):
        ``(act(x @ gate.T) * (x @ up.T)) @ down`` (pass ``act=F.silu``). Row order is irrelevant.
        By default every resident row takes part, as in the paper (sec 3.3: up = matrix[:num_rows]);
        with ReLU the rows of inactive neurons add exact zeros. ``only`` (neuron ids, all
        resident) restricts the sum to those neurons, e.g. the current token's predicted set
        of a gated FFN, whose other rows would add non-zero terms.
        """
        x = x.to(self.dtype)
        up = self.vector("up")
        if "bias" in self.scalar_names:                                 # one fused call for a token [1, d]
            b = self.scalar("bias")
            pre = torch.addmm(b, x, up.T) if x.dim() == 2 else x @ up.T + b       # [..., num_used]
        else:
            pre = x @ up.T
        h = act(x @ self.vector("gate").T) * pre if "gate" in self.vector_names else act(pre)
        if only is not None:
            rows = self.row_of[_ids(only, self.d_ffn, "ffn only")]
            if (rows < 0).any():
                raise KeyError("ffn: some neurons in `only` are not resident")
            keep = torch.zeros(self.num_used, dtype=h.dtype, device=h.device)
            keep[torch.from_numpy(rows).to(h.device)] = 1
            h = h * keep
        y = h @ self.vector("down")                                     # [..., d_model]
        return y + output_bias.to(y.dtype) if output_bias is not None else y

    # --- checks shared by insert/delete (raise before anything changes) ---
    def _check_insert(self, neuron_ids, rows, scalars):
        ids = _ids(neuron_ids, self.d_ffn, "insert")
        if (self.row_of[ids] >= 0).any():
            raise ValueError(f"insert: neurons already resident: {ids[self.row_of[ids] >= 0][:10].tolist()}")
        if self.num_used + ids.size > self.capacity:
            raise DramBudgetError(
                f"insert of {ids.size} rows into a matrix holding {self.num_used} of {self.capacity} "
                f"rows ({self.bytes_capacity} B): over capacity by {self.num_used + ids.size - self.capacity} "
                f"rows; allocate more rows (a larger budget) or use a smaller window k")
        return (ids, *self._payload(ids.size, rows, scalars))

    def _payload(self, n: int, rows, scalars) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rows`` as ``[n, bundle_width]`` and the scalars as ``[n, n_scalars]`` (None without scalars)."""
        rows = _torch_rows(rows, n, self.bundle_width, "insert rows")
        sc = None
        if self.scalar_names:
            if scalars is None or set(scalars) != set(self.scalar_names):
                raise ValueError(f"insert: scalars must give exactly {self.scalar_names}, "
                                 f"got {None if scalars is None else sorted(scalars)}")
            sc = torch.stack([torch.as_tensor(scalars[k]).reshape(-1) for k in self.scalar_names], dim=1) \
                if len(self.scalar_names) > 1 else torch.as_tensor(scalars[self.scalar_names[0]]).reshape(-1, 1)
            if sc.shape[0] != n:
                raise ValueError(f"insert: scalars have {sc.shape[0]} rows for {n} neurons")
        return rows, sc

    def _check_update(self, evict, load) -> tuple[np.ndarray, np.ndarray]:
        """``update``'s id checks, each once: (evict ids, load ids).

        A neuron may leave and come back in one update (delete, then insert); one resident and
        not evicted cannot be loaded again, and the result must fit the capacity.
        """
        ev = self._check_delete(evict)
        lid = _ids(load, self.d_ffn, "insert")
        back = lid[self.row_of[lid] >= 0]
        stay = np.setdiff1d(back, ev) if back.size else back
        if stay.size:
            raise ValueError(f"insert: neurons already resident: {stay[:10].tolist()}")
        over = self.num_used - ev.size + lid.size - self.capacity
        if over > 0:
            raise DramBudgetError(f"update: {lid.size} rows in, {ev.size} out of a matrix holding {self.num_used} "
                                  f"of {self.capacity} rows: over capacity by {over} rows; allocate more rows "
                                  "(a larger budget) or use a smaller window k")
        return ev, lid

    def _check_delete(self, neuron_ids) -> np.ndarray:
        ids = _ids(neuron_ids, self.d_ffn, "delete")
        absent = self.row_of[ids] < 0
        if absent.any():
            raise KeyError(f"delete: neurons not resident: {ids[absent][:10].tolist()}")
        return ids

    def update(self, evict, load, rows, scalars=None) -> None:
        """One token's memory management: delete ``evict``, then insert ``load`` with ``rows``
        (both checked first: nothing changes on error)."""
        ev, lid = self._check_update(evict, load)
        self._payload(lid.size, rows, scalars)
        self.delete(ev)
        self.insert(lid, rows, scalars)


class NeuronMatrix(_MatrixBase):
    """The paper's preallocated matrix (Fig 6): fixed tensors, delete by moving the last rows, append.

    ``matrix [capacity, bundle_width]`` and ``scalars [capacity, n_scalars]`` are torch tensors in
    the model dtype, ``pointer [capacity]`` (numpy int64) the original neuron id of each row.
    """

    def __init__(self, capacity, d_model, d_ffn, vector_names=("up", "down"), scalar_names=(),
                 dtype=torch.float16, device="cpu", budget_bytes=None):
        super().__init__(capacity, d_model, d_ffn, vector_names, scalar_names, dtype, device, budget_bytes)
        self.matrix = torch.zeros(self.capacity, self.bundle_width, dtype=dtype, device=self.device)
        self.scalars = torch.zeros(self.capacity, len(self.scalar_names), dtype=dtype, device=self.device)
        self.pointer = np.full(self.capacity, -1, dtype=np.int64)
        # On the CPU rows move through integer numpy views of the same memory (any dtype): a token
        # moves a handful of rows, where torch's per-call dispatch costs more than the copy,
        # and update() is one compiled call (kernels.matrix_update).
        host = self.device.type == "cpu"
        self._mat_np = _words(self.matrix) if host else None
        self._sc_np = _words(self.scalars) if host else None
        self._mat_dtype = None if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
        # element-level view for rows converted from fp16 while they are put (bf16: uint16, fp32: uint32)
        el = {torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(dtype) if host else None
        self._el_np = self.matrix.view(el).numpy().view(np.uint16 if el == torch.int16 else np.uint32) \
            if el is not None else None

    def _move_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Rows ``src`` -> rows ``dst`` (disjoint), weights, scalars and the index."""
        if self._mat_np is not None:
            self._mat_np[dst] = self._mat_np[src]
            if self.scalar_names:
                self._sc_np[dst] = self._sc_np[src]
        else:
            d, s_ = torch.from_numpy(dst).to(self.device), torch.from_numpy(src).to(self.device)
            self.matrix.index_copy_(0, d, self.matrix.index_select(0, s_))
            if self.scalar_names:
                self.scalars.index_copy_(0, d, self.scalars.index_select(0, s_))
        self.pointer[dst] = self.pointer[src]
        self.row_of[self.pointer[dst]] = dst

    def _write_rows(self, dst, ids: np.ndarray, rows: torch.Tensor, sc: torch.Tensor | None) -> None:
        """New bundles (and scalars) of neurons ``ids`` into rows ``dst`` (an index array or a slice)."""
        if self._mat_np is not None and rows.device.type == "cpu":
            self._mat_np[dst] = _words(rows.to(self.dtype))
            if sc is not None:
                self._sc_np[dst] = _words(sc.to(self.dtype))
        else:
            d = dst if isinstance(dst, slice) else torch.from_numpy(dst).to(self.device)
            self.matrix[d] = rows.to(device=self.device, dtype=self.dtype)
            if sc is not None:
                self.scalars[d] = sc.to(device=self.device, dtype=self.dtype)
        self.pointer[dst] = ids
        self.row_of[ids] = np.arange(self.capacity)[dst]

    @classmethod
    def from_budget(cls, budget_bytes: int, d_model: int, d_ffn: int, vector_names=("up", "down"),
                    scalar_names=(), dtype=torch.float16, device="cpu") -> "NeuronMatrix":
        """As many rows as ``budget_bytes`` holds (never more than d_ffn)."""
        per_row = (len(vector_names) * d_model + len(scalar_names)) * _itemsize(dtype)
        return cls(min(d_ffn, budget_bytes // per_row), d_model, d_ffn, vector_names, scalar_names,
                   dtype, device, budget_bytes)

    def pointer_array(self) -> np.ndarray:
        return self.pointer

    def used_matrix(self) -> torch.Tensor:
        return self.matrix[: self.num_used]

    def used_scalars(self) -> torch.Tensor:
        return self.scalars[: self.num_used]

    def delete(self, neuron_ids) -> int:
        """Free the rows of ``neuron_ids`` by moving rows from the end of the filled region into them.

        Returns the number of rows moved (at most c = len(neuron_ids)): O(c * d_model).
        """
        ids = self._check_delete(neuron_ids)
        if ids.size == 0:
            return 0
        n_after = self.num_used - ids.size
        rows = self.row_of[ids]
        holes = np.sort(rows[rows < n_after])                 # evicted rows inside the kept prefix
        tail_evicted = np.zeros(ids.size, dtype=bool)         # tail rows [n_after, num_used)
        tail_evicted[rows[rows >= n_after] - n_after] = True
        sources = n_after + np.flatnonzero(~tail_evicted)     # surviving rows past the new end
        if holes.size:
            self._move_rows(holes, sources)                    # disjoint row sets
        self.row_of[ids] = -1
        self.pointer[n_after: self.num_used] = -1
        self.num_used = n_after
        return int(holes.size)

    def update(self, evict, load, rows, scalars: dict | None = None) -> None:
        """One token's memory management in one pass: delete ``evict``, insert ``load`` with ``rows``.

        The same resident set as ``delete`` then ``insert`` (row order aside) with fewer copies:
        the loaded bundles are written straight into the evicted rows' holes (then appended),
        and only when fewer neurons load than leave do the last rows move into the holes that
        are left (Fig 6's move). The paper deletes, then appends; this saves one row move per
        loaded neuron and a pass of index work (measured in notebook 07). Every check comes
        first: nothing changes on error.
        On the CPU, sorted int64 id arrays take one compiled call that checks and applies
        (``kernels.matrix_update``; there a neuron leaving and coming back, as with no window,
        keeps its row and is overwritten in place). Other inputs (lists, unsorted ids, another
        device) take the paper's way, delete then insert, checked first the same way.
        """
        if self._mat_np is not None and isinstance(rows, torch.Tensor) and rows.device.type == "cpu" \
                and self._fast_update(evict, load, _words(rows.to(self.dtype)), scalars):
            return
        super().update(evict, load, rows, scalars)

    def words_of(self, rows: torch.Tensor) -> np.ndarray | None:
        """The integer-word view (no copy) of CPU ``rows [n, bundle_width]`` in this matrix's dtype, for
        ``update_words``; None where there is none (another dtype or device, rows not word-aligned).

        Made once for a buffer that is refilled in place (the engine's read buffer), its slices
        ``[:n]`` spare ``update`` a tensor-to-numpy view per call (inside a generate on our machine
        that view cost ~50 us per layer and token, a third of the memory-management time).
        """
        if self._mat_np is None or rows.device.type != "cpu" or rows.dtype != self.dtype \
                or rows.dim() != 2 or rows.shape[1] != self.bundle_width or rows.numel() == 0:
            return None
        try:
            w = _words(rows)
        except RuntimeError:                                   # a view torch cannot reinterpret
            return None
        ok = w.dtype == self._mat_np.dtype and np.shares_memory(w, rows.numpy() if rows.dtype != torch.bfloat16
                                                                 else rows.view(torch.int16).numpy())
        return w if ok else None

    def update_words(self, evict, load, words: np.ndarray, scalars: dict | None = None) -> None:
        """``update`` with the new bundles as ``words_of(rows)[:n]``: the same checks and result."""
        if self._fast_update(evict, load, words, scalars):
            return
        if not (isinstance(words, np.ndarray) and words.dtype == self._mat_np.dtype and words.ndim == 2):
            raise TypeError(f"update_words: expected a [n, {self._mat_np.shape[1]}] {self._mat_np.dtype} view "
                            f"from words_of(), got {type(words).__name__} {getattr(words, 'dtype', '')}")
        rows = torch.from_numpy(np.ascontiguousarray(words)).view(self.dtype)
        super().update(evict, load, rows, scalars)             # finds and names the problem

    def update_f16(self, evict, load, rows16: np.ndarray, scalars: dict | None = None) -> None:
        """``update`` with the new bundles as fp16 bits (``[n, bundle_width]`` uint16, e.g. a view of the read
        buffer of an fp16 flash file) for a bf16 or fp32 matrix: converted while they are put, in one pass
        (``kernels.put_rows_f16``), exactly as ``torch.Tensor.to`` casts. Same checks and result as ``update``."""
        if self._el_np is not None and self._fast_update(evict, load, rows16, scalars, f16=True):
            return
        rows = torch.from_numpy(np.ascontiguousarray(rows16).view(np.float16))
        super().update(evict, load, rows, scalars)             # converts; finds and names any problem

    def _fast_update(self, evict, load, rows, scalars, f16: bool = False) -> bool:
        """``update`` in two compiled calls (``kernels.matrix_plan``, then ``put_rows`` or ``put_rows_f16``)
        with the new bundles as integer words of the matrix dtype (``_words``) or as fp16 bits; False
        (nothing changed) when the kernel's checks or the input forms do not hold."""
        want = (np.uint16, self.bundle_width) if f16 else (self._mat_np.dtype, self._mat_np.shape[1])
        if not (type(evict) is np.ndarray and type(load) is np.ndarray and evict.dtype == load.dtype == np.int64
                and evict.ndim == load.ndim == 1 and type(rows) is np.ndarray and rows.dtype == want[0]
                and rows.ndim == 2 and rows.shape == (load.size, want[1])):
            return False
        if self.scalar_names:
            sc = scalars.get(self.scalar_names[0]) if isinstance(scalars, dict) and len(scalars) == 1 else None
            if len(self.scalar_names) != 1:
                return False
            if isinstance(sc, np.ndarray) and sc.ndim == 2 and sc.dtype == self._sc_np.dtype:   # words already
                pass
            elif isinstance(sc, np.ndarray) and sc.dtype == self._mat_dtype:     # e.g. a numpy bias gather
                sc = np.ascontiguousarray(sc).reshape(-1, 1).view(self._sc_np.dtype)
            elif isinstance(sc, torch.Tensor) and sc.device.type == "cpu":
                sc = _words(sc.reshape(-1, 1).to(self.dtype))
            else:
                return False
            if sc.shape[0] != load.size:
                return False
        elif scalars:
            return False
        else:
            sc = np.zeros((load.size, 0), self._sc_np.dtype)
        from .window import kernels             # numba on first use (see window.kernels)
        k = kernels()
        n1, dest = k.matrix_plan(self._mat_np, self._sc_np, evict, load, self.row_of, self.pointer, self.num_used)
        if n1 < 0:
            return False
        if f16:
            k.put_rows_f16(self._el_np, self._sc_np, dest, rows, sc, self.dtype == torch.bfloat16)
        else:
            k.put_rows(self._mat_np, self._sc_np, dest, rows, sc)
        self.num_used = n1
        return True

    def insert(self, neuron_ids, rows, scalars: dict | None = None) -> None:
        """Write bundles ``rows [n, bundle_width]`` (and per-row scalars) at rows num_used .. num_used+n-1.

        Raises ``DramBudgetError`` (nothing modified) when the rows do not fit.
        """
        ids, rows, sc = self._check_insert(neuron_ids, rows, scalars)
        n0, n1 = self.num_used, self.num_used + ids.size
        self._write_rows(slice(n0, n1), ids, rows, sc)
        self.num_used = n1


class NaiveNeuronMatrix(_MatrixBase):
    """The realloc-and-copy baseline of the Fig 6 ablation: same interface, new tensors every call.

    Delete keeps the surviving rows with a gather (a full copy), insert concatenates
    (``torch.cat``: another full copy), so every token rewrites the whole cached FFN, the cost
    the paper's section 3.3 avoids. ``capacity`` is still enforced, so both variants hold the
    same neurons under the same budget.
    """

    def __init__(self, capacity, d_model, d_ffn, vector_names=("up", "down"), scalar_names=(),
                 dtype=torch.float16, device="cpu", budget_bytes=None):
        super().__init__(capacity, d_model, d_ffn, vector_names, scalar_names, dtype, device, budget_bytes)
        self.matrix = torch.zeros(0, self.bundle_width, dtype=dtype, device=self.device)
        self.scalars = torch.zeros(0, len(self.scalar_names), dtype=dtype, device=self.device)
        self.pointer = np.zeros(0, dtype=np.int64)

    def pointer_array(self) -> np.ndarray:
        return self.pointer

    def used_matrix(self) -> torch.Tensor:
        return self.matrix

    def used_scalars(self) -> torch.Tensor:
        return self.scalars

    def delete(self, neuron_ids) -> int:
        """Rebuild the tensors without the evicted rows; returns the rows copied (all survivors)."""
        ids = self._check_delete(neuron_ids)
        keep = np.ones(self.num_used, dtype=bool)
        keep[self.row_of[ids]] = False
        k = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
        self.matrix, self.scalars = self.matrix[k], self.scalars[k]     # new allocations
        self.row_of[ids] = -1
        self.pointer = self.pointer[keep]
        self.row_of[self.pointer] = np.arange(self.pointer.size)
        self.num_used = int(self.pointer.size)
        return self.num_used

    def insert(self, neuron_ids, rows, scalars: dict | None = None) -> None:
        ids, rows, sc = self._check_insert(neuron_ids, rows, scalars)
        self.matrix = torch.cat([self.matrix, rows.to(self.device, self.dtype)])
        if sc is not None:
            self.scalars = torch.cat([self.scalars, sc.to(self.device, self.dtype)])
        else:
            self.scalars = torch.zeros(self.matrix.shape[0], 0, dtype=self.dtype, device=self.device)
        self.row_of[ids] = np.arange(self.num_used, self.num_used + ids.size)
        self.pointer = np.concatenate([self.pointer, ids])
        self.num_used = int(self.pointer.size)


# --- whole-model budget -------------------------------------------------------------------


@dataclass
class DramBudget:
    """Byte accountant of one model's DRAM: the resident part plus every layer's neuron matrix.

    ``add_resident`` registers weights that never leave DRAM (attention, embeddings, norms,
    predictors, FFN biases); ``reserve_matrices`` then checks that the window's matrices fit
    in what is left and refuses otherwise, naming the minimum budget.
    """

    budget_bytes: int
    resident: dict = field(default_factory=dict)     # name -> bytes
    matrices: dict = field(default_factory=dict)     # layer -> bytes_capacity

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def matrix_bytes(self) -> int:
        return sum(self.matrices.values())

    @property
    def used_bytes(self) -> int:
        return self.resident_bytes + self.matrix_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def add_resident(self, name: str, nbytes: int) -> None:
        """Register an always-resident part; refuses when the resident part alone exceeds the budget."""
        total = self.used_bytes - self.resident.get(name, 0) + int(nbytes)
        if total > self.budget_bytes:
            raise DramBudgetError(
                f"resident part '{name}' ({nbytes} B) does not fit: total would be {total} B "
                f"> budget {self.budget_bytes} B; minimum budget is {total} B")
        self.resident[name] = int(nbytes)

    def reserve_matrices(self, rows_per_layer, bytes_per_row: int) -> None:
        """Reserve ``rows_per_layer[l] * bytes_per_row`` for each layer's matrix, all or nothing."""
        need = {l: int(r) * int(bytes_per_row) for l, r in enumerate(rows_per_layer)}
        total = self.resident_bytes + sum(need.values())
        if total > self.budget_bytes:
            raise DramBudgetError(
                f"DRAM budget {self.budget_bytes} B cannot hold the resident part ({self.resident_bytes} B) "
                f"plus the window's neuron matrices ({sum(need.values())} B = {sum(map(int, rows_per_layer))} "
                f"rows x {bytes_per_row} B); minimum budget is {total} B, or use a smaller window k")
        self.matrices = need

    def rows_that_fit(self, bytes_per_row: int, n_layers: int) -> int:
        """Rows per layer that an equal split of the free (non-resident) bytes allows."""
        return max(0, (self.budget_bytes - self.resident_bytes) // (bytes_per_row * n_layers))

    def report(self) -> pd.DataFrame:
        """part | bytes | share_of_budget, with the matrices and the total."""
        rows = [(k, v) for k, v in self.resident.items()]
        rows += [("neuron matrices", self.matrix_bytes), ("total", self.used_bytes)]
        df = pd.DataFrame(rows, columns=["part", "bytes"])
        df["share_of_budget"] = df["bytes"] / self.budget_bytes
        return df


def capacity_for_window(peak_rows: int, d_ffn: int, margin: float = DRAM.capacity_margin) -> int:
    """Rows to preallocate for a window whose largest resident set on a sizing trace was ``peak_rows``
    (``window.window_capacity``; the paper's Req_i), plus ``margin``, never more than d_ffn."""
    return int(min(d_ffn, math.ceil(peak_rows * (1 + margin) - 1e-9)))   # 1e-9: 100 * 1.1 is 110.00000000000001


def dram_bytes_moved(n_resident: int, n_evict: int, n_load: int, bytes_per_row: int,
                     naive: bool = False, one_pass: bool = False) -> int:
    """Bytes written in DRAM by one token's update (cost-model input, paper sec 3.3).

    Preallocated (the paper: delete, then insert): an upper bound, one row moved per eviction
    (fewer when evicted rows sit at the end of the filled region) plus the new rows, O(c * d_model).
    ``one_pass`` (``NeuronMatrix.update``): the new rows fill the holes, so only the evictions
    beyond the loads move a row.
    Naive: every surviving row is copied (twice: gather, then cat) plus the new rows.
    """
    if naive:
        return (2 * (n_resident - n_evict) + n_load) * bytes_per_row
    moves = max(0, n_evict - n_load) if one_pass else n_evict
    return (min(moves, max(0, n_resident - n_evict)) + n_load) * bytes_per_row


CONVERT_ELEMS = 1 << 18     # values per pass through the fp32 scratch of ``convert_into`` (1 MiB)


def convert_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` across dtypes, e.g. flash-file rows (fp16) into DRAM rows (bf16 or fp32).

    Between two 16-bit float types (fp16 <-> bf16) the copy goes through an fp32 scratch of at most
    ``CONVERT_ELEMS`` values: 3.5x faster on this CPU than torch's direct cast (measured: 2.1 vs
    ~6 GB/s). ``dst``, ``src``: same shape, 1-D or 2-D (rows may be strided).
    """
    sixteen = {torch.float16, torch.bfloat16}
    if dst.dtype == src.dtype or not (dst.dtype in sixteen and src.dtype in sixteen) or dst.device.type != "cpu":
        dst.copy_(src)
        return
    if dst.dim() == 1:
        dst, src = dst.view(1, -1), src.view(1, -1)
    step = max(1, CONVERT_ELEMS // max(1, dst.shape[1]))
    scratch = torch.empty(min(step, dst.shape[0]), dst.shape[1], dtype=torch.float32)
    for s in range(0, dst.shape[0], step):
        e = min(dst.shape[0], s + step)
        tmp = scratch[:e - s]
        tmp.copy_(src[s:e])
        dst[s:e].copy_(tmp)
