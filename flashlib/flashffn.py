"""The flash-backed FFN layer (paper sec 3, Fig 6): active set -> window -> flash reads -> DRAM matrix -> FFN.

This is flashlib's one per-token sparse path. Every tier (SmolLM2, the ReLU OPT, OPT 6.7B's
geometry) and every sparse method (+predictor, +windowing, +bundling) runs it; a method is a
switch of ``EngineConfig``, never a second loop. Per token and layer::

    active set (ActiveSets: all | oracle | predictor on the FFN input x | trace[position])
      -> SlidingWindow.update             which neurons to load / evict (window k)
      -> FlashStore.read(load)            O_DIRECT reads into a preallocated aligned buffer
      -> NeuronMatrix.update_words(evict, load)   new bundles fill the evicted rows (Fig 6);
                                          fp16 on flash, bf16 or fp32 in DRAM: converted as they are put
      -> y = matrix.ffn(x)                over ALL resident rows (ReLU: inactive rows add zeros);
                                          the trace policy sums only the token's set

``FlashFFN`` owns the layers' windows and matrices, the read buffer and the counters that the
clock (``flashlib.clock``) turns into io_ms / mem_ms per step. There is no fallback to dense
compute: a failed or short read stops generation with an ``EngineError``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .clock import Counters, EngineError
from .dram import NaiveNeuronMatrix, NeuronMatrix, _words, convert_into
from .sparsity import active_mask, default_mask_rule, down_norms, topk_mask
from .store import FlashFileError
from .window import SlidingWindow

POLICIES = ("all", "oracle", "predictor", "trace")


class ActiveSets:
    """The policy's active set of each token: which FFN neurons a layer needs.

    * "all": every neuron (the dense-equivalence check);
    * "oracle": the model's true active set (ReLU's exact zeros; a gated FFN's mask rule);
    * "predictor": the low-rank predictors' set (thresholds, or a per-token top-k ``density``);
    * "trace": row ``[position, layer]`` of a given bool trace ``[T, n_layers, d_ffn]`` (the
      calibrated generator of ``flashlib.traces`` at paper scale, where the weights are synthetic
      and a set computed from them would mean nothing). Given predictors run on x for their cost
      (the set they would pick is not used). Its FFN sums only the token's set (``restrict``),
      since synthetic weights do not zero the other rows.
    """

    def __init__(self, policy: str, adapter, predictors=None, density: float | None = None,
                 trace: np.ndarray | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "predictor" and predictors is None:
            raise ValueError("policy 'predictor' needs predictors (flashlib.predictor.fit_predictors)")
        if policy == "trace":
            want = (adapter.n_layers, adapter.d_ffn)
            if trace is None or trace.ndim != 3 or trace.shape[1:] != want or trace.dtype != np.bool_:
                got = None if trace is None else f"{trace.dtype} {trace.shape}"
                raise ValueError(f"policy 'trace' needs a bool trace [tokens, {want[0]}, {want[1]}], got {got}")
        self.policy, self.adapter, self.predictors, self.density = policy, adapter, predictors, density
        self.trace = trace
        self.restrict = policy == "trace"
        self.rule = default_mask_rule(adapter)
        self.norms = ({l: down_norms(adapter, l) for l in range(adapter.n_layers)}
                      if policy == "oracle" and self.rule.weight_by_down_norm else {})
        self.has = set(predictors.layers) if predictors is not None else set()
        self._all = torch.ones(adapter.d_ffn, dtype=torch.bool)

    def batch(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masks ``[n, d_ffn]`` and scores for FFN inputs ``[n, d_model]`` (scores rank who to keep).

        Not for "trace", whose sets depend on the position, not on x (``token``).
        """
        if self.policy == "trace":
            raise ValueError("the trace policy's sets come from positions: use ActiveSets.token")
        if self.policy == "all" or (self.policy == "predictor" and layer not in self.has):
            return self._all.expand(x.shape[0], -1), None
        if self.policy == "oracle":
            act = self.adapter.activation(layer, x)
            return active_mask(act, self.rule, self.norms.get(layer)), act.abs()
        z = self.predictors.logits(layer, x)
        if self.density is not None:
            return topk_mask(z, self.density), z
        return z > self.predictors.meta.thresholds.get(layer, 0.0), z

    def token(self, layer: int, x: torch.Tensor, position: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """One token's mask ``[d_ffn]`` (numpy bool) and scores ``[d_ffn]`` (None: no ranking)."""
        if self.policy == "trace":
            if position >= self.trace.shape[0]:
                raise EngineError(f"the trace has {self.trace.shape[0]} tokens; position {position} is past "
                                  "its end: generate fewer tokens or use a longer trace")
            if layer in self.has:             # the predictor runs for its cost; the trace gives the set
                self.predictors.logits(layer, x)
            return self.trace[position, layer], None
        mask, score = self.batch(layer, x)
        return mask[0].cpu().numpy(), None if score is None else score[0]


def pair_evictions(evict: np.ndarray, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The evictions of each read round (sorted), so that each round frees about as many rows as it
    fills: the new rows land in the freed rows and no surviving row has to move (one round with every
    eviction and a buffer's worth of loads would move the rest of the matrix's tail into the holes).
    An id that leaves and comes back (no window, k=0) leaves in the round that loads it, or before;
    the last round takes the rest. One round: every eviction."""
    if len(chunks) <= 1 or evict.size == 0:
        return [evict] + [evict[:0]] * (len(chunks) - 1)
    load = np.concatenate(chunks)                         # sorted, like evict
    back = _members(evict, load)
    free, returning, out, pos = evict[~back], evict[back], [], 0
    for r, ids in enumerate(chunks):
        must = returning[_members(returning, ids)]
        take = free.size - pos if r == len(chunks) - 1 else max(0, ids.size - must.size)
        part = free[pos:pos + take]
        out.append(np.union1d(must, part) if must.size else part)
        pos += take
    return out


def _members(a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """``np.isin(a, b)`` for a sorted ``b`` (a binary search: cheaper than isin's hashing here)."""
    if sorted_b.size == 0:
        return np.zeros(a.size, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_b, a), sorted_b.size - 1)
    return sorted_b[i] == a


def keep_capacity(mask: np.ndarray, score: torch.Tensor | None, capacity: int) -> np.ndarray:
    """The ``capacity`` neurons of an over-full set to keep: the highest scores, or without scores
    (the trace policy) the lowest ids. ``mask [d_ffn]`` bool -> a new mask with ``capacity`` set."""
    if score is None:
        keep = np.flatnonzero(mask)[:capacity]
    else:
        keep = torch.where(torch.from_numpy(mask).to(score.device), score,
                           torch.finfo(score.dtype).min).topk(capacity).indices.cpu().numpy()
    out = np.zeros_like(mask)
    out[keep] = True
    return out


@dataclass
class LayerState:
    window: SlidingWindow
    matrix: NeuronMatrix | NaiveNeuronMatrix
    capacity: int
    act: nn.Module                     # the layer's activation (ReLU for OPT, SiLU for the gate)
    bias: torch.Tensor | None          # [d_ffn] up-projection bias (resident), per-row scalar
    out_bias: torch.Tensor | None      # [d_model]

    def __post_init__(self):           # preallocated CPU matrix: gather the biases as integer words, one numpy call
        b = self.bias
        fast = b is not None and b.device.type == "cpu" and isinstance(self.matrix, NeuronMatrix)
        self.bias_rows = _words(b.reshape(-1, 1)) if fast else b

    def loaded_bias(self, ids: np.ndarray) -> dict | None:
        if self.bias is None:
            return None
        if isinstance(self.bias_rows, np.ndarray):
            return {"bias": self.bias_rows[ids]}                 # [n, 1] words of the matrix dtype
        return {"bias": self.bias[torch.from_numpy(ids).to(self.bias.device)]}


def conversion(flash_dtype: str, dtype: torch.dtype, preallocated: bool, device) -> str:
    """How loaded bundles reach the matrix: "same" (one dtype: a word copy), "f16" (fp16 flash file, bf16
    or fp32 preallocated CPU matrix: converted while put, ``NeuronMatrix.update_f16``) or "convert"
    (anything else: cast into a rows buffer of the compute dtype first, ``dram.convert_into``)."""
    if torch.from_numpy(np.zeros(0, dtype=flash_dtype)).dtype == dtype:
        return "same"
    if flash_dtype == "float16" and dtype in (torch.bfloat16, torch.float32) and preallocated \
            and torch.device(device).type == "cpu":
        return "f16"
    return "convert"


class LoadedRows:
    """The read buffer's bundles as the matrix takes them (``conversion``): ``rows(n)`` -> integer words
    of the matrix dtype, fp16 bits (uint16), or a tensor of the compute dtype.

    Same dtype: a word view of the buffer made once (``NeuronMatrix.words_of``). "f16": a uint16
    view of the buffer made once. "convert": cast into a preallocated rows buffer of the compute
    dtype, whose word view is made once.
    """

    def __init__(self, buffer, vector_names, matrix, dtype: torch.dtype, device, mode: str):
        self.buffer, self.vector_names, self.mode = buffer, vector_names, mode
        try:
            self.view = buffer.bundles(torch=True)      # [capacity, bundle_width] flash dtype
        except ValueError:                              # separate layout with padded rows
            self.view = None
        self.converted = self.words = self.bits = None
        if mode == "convert":
            self.converted = torch.empty(buffer.capacity, len(vector_names) * buffer.d_model, dtype=dtype,
                                         device=device)
        if mode == "f16" and self.view is not None:
            self.bits = self.view.numpy().view(np.uint16)
        target = self.converted if mode == "convert" else self.view if mode == "same" else None
        if isinstance(matrix, NeuronMatrix) and target is not None and target.device.type == "cpu":
            self.words = matrix.words_of(target)

    def extra_bytes(self) -> int:
        """DRAM beside the read buffer itself: the converted rows."""
        return 0 if self.converted is None else self.converted.numel() * self.converted.element_size()

    def rows(self, n: int):
        if self.bits is not None:
            return self.bits[:n]
        if self.view is not None:
            src = self.view[:n]
        else:
            vecs = self.buffer.vectors(n, torch=True)
            src = torch.cat([vecs[name] for name in self.vector_names], dim=1)
        if self.mode == "f16":
            return src.numpy().view(np.uint16)
        if self.converted is not None:
            convert_into(self.converted[:n], src)
            src = self.converted[:n]
        return self.words[:n] if self.words is not None else src


class FlashFFN:
    """Every layer's flash-backed FFN: the per-token loop (module docstring), its state and counters.

    ``layers[l]`` holds layer l's window and matrix; ``store`` and ``buffer`` are shared by all
    layers (one layer reads at a time). ``counters`` accumulate io/mem seconds and the work.
    """

    def __init__(self, store, buffer, layers: list[LayerState], active: ActiveSets, rows: LoadedRows,
                 counters: Counters | None = None):
        self.store, self.buffer, self.layers, self.active, self.loaded = store, buffer, layers, active, rows
        self.counters = counters or Counters()
        self.reading = False                     # a read in flight (interrupted reads need a recover)

    def token(self, layer: int, x: torch.Tensor, position: int) -> torch.Tensor:
        """One token ``x [1, d_model]`` at sequence ``position`` through layer ``layer`` -> ``[1, d_model]``."""
        st, c = self.layers[layer], self.counters
        mask, score = self.active.token(layer, x, position)
        if np.count_nonzero(mask) > st.capacity:          # never exceed the matrix
            mask = keep_capacity(mask, score, st.capacity)
            c.truncated += 1
        t0 = time.perf_counter()
        step = st.window.update(mask)
        evict = step.evict
        if step.n_resident > st.capacity:
            evict = np.union1d(evict, st.window.shrink_to_fit(st.capacity))
            c.shrunk += 1
        io = 0.0
        n, cap = step.load.size, self.buffer.capacity
        if n == 0 and evict.size:
            st.matrix.delete(evict)
        chunks = [step.load[s:s + cap] for s in range(0, n, cap)]   # a load larger than the buffer goes in rounds
        for ids, ev in zip(chunks, pair_evictions(evict, chunks)):
            t_r = time.perf_counter()
            self.read(layer, ids)
            io += time.perf_counter() - t_r
            rows = self.loaded.rows(ids.size)
            # evict and load in one pass: the new bundles fill the evicted rows (dram.NeuronMatrix.update)
            if self.loaded.mode == "f16":
                st.matrix.update_f16(ev, ids, rows, st.loaded_bias(ids))
            elif isinstance(rows, np.ndarray):
                st.matrix.update_words(ev, ids, rows, st.loaded_bias(ids))
            else:
                st.matrix.update(ev, ids, rows, st.loaded_bias(ids))
        c.io_s += io
        c.mem_s += time.perf_counter() - t0 - io
        c.neurons_loaded += n
        c.neurons_evicted += evict.size
        only = np.flatnonzero(mask) if self.active.restrict else None
        return st.matrix.ffn(x, st.act, st.out_bias, only=only).to(x.dtype)

    def read(self, layer: int, ids: np.ndarray) -> None:
        """``ids`` of ``layer`` into the read buffer; a failed read stops generation (no dense fallback)."""
        self.reading = True
        before = self.store.counters.reads
        try:
            self.counters.bytes_read += self.store.read(layer, ids, self.buffer)
        except FlashFileError as e:
            raise EngineError(f"flash read of layer {layer} ({ids.size} neurons) from {self.store.path} "
                              f"failed: {e}. Generation stops (no dense fallback); rewrite the flash file "
                              "or delete it so the engine writes it again") from e
        self.counters.reads += self.store.counters.reads - before
        self.reading = False

    def reset(self) -> None:
        """Empty every window and matrix (a new sequence starts with nothing cached)."""
        for st in self.layers:
            st.window.reset()
            st.matrix.delete(st.matrix.resident_ids())

    def bytes_resident(self) -> int:
        """The matrices' filled rows."""
        return sum(st.matrix.bytes_resident for st in self.layers)


class SparseFFN(nn.Module):
    """The whole FFN x ``[..., d_model]`` -> y ``[..., d_model]`` of one layer, from the DRAM matrix.

    Tokens go one at a time (prefill included), at positions ``engine.step_start + t``.
    """

    def __init__(self, engine, layer: int):
        super().__init__()
        self.__dict__["engine"] = engine          # not a submodule: keeps state_dict() empty
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])           # [n_tokens, d_model]; batch 1, so rows are tokens
        flash, p0 = self.engine.flash, self.engine.step_start
        if x2.shape[0] == 1:
            return flash.token(self.layer, x2, p0).view(x.shape)
        return torch.cat([flash.token(self.layer, x2[t:t + 1], p0 + t) for t in range(x2.shape[0])]).view(x.shape)
