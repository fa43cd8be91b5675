"""Per-step timing (paper Table 3's I/O / memory management / compute split) for every runner inside ``generate()``.

One clock serves the sparse engine, the dense streaming baselines and accelerate: a forward
pre/post hook on the top-level model marks step boundaries (a step is one forward call: the
prompt's tokens at prefill, one token per decode step), and each runner adds its I/O and
memory-management seconds and its byte counts to a shared ``Counters``. A step's row is the
difference of two snapshots; compute is the rest of the step's wall time (attention, FFN,
predictor, sampling, the generate loop).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch


class EngineError(RuntimeError):
    """Generation cannot go on (a failed flash read, bad input); never answered by dense compute."""


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any KeyboardInterrupt) during generation; the runner was reset and stays usable."""


@dataclass
class Counters:
    """Cumulative work of one runner; a step's row is the difference of two snapshots."""

    io_s: float = 0.0            # wall time inside flash reads (or page faults, for the page cache)
    mem_s: float = 0.0           # window logic + DRAM matrix update (evict + load) + row conversion
    bytes_read: int = 0
    reads: int = 0               # preadv calls (page cache: major faults)
    neurons_loaded: int = 0
    neurons_evicted: int = 0
    shrunk: int = 0              # (token, layer) pairs whose window was shrunk to fit the matrix
    truncated: int = 0           # (token, layer) pairs whose active set alone exceeded the matrix

    def snapshot(self) -> dict:
        return dict(self.__dict__)            # flat fields: a dict copy (asdict's recursion cost ~0.5 ms/step)


class TokenClock:
    """Marks step boundaries and keeps one row per step.

    A step's total runs from its forward's start to the next forward's start (so sampling and
    the generate loop count as compute), or to ``finish()``. ``refresh`` (optional) is called
    before each snapshot, for counters that come from outside (the kernel's I/O counters).
    """

    def __init__(self, counters: Counters, resident_bytes, refresh=None):
        self.counters, self.resident_bytes, self.refresh = counters, resident_bytes, refresh
        self.rows: list[dict] = []
        self._open: dict | None = None
        self._fwd_end = None

    def _snap(self) -> dict:
        if self.refresh is not None:
            self.refresh(self.counters)
        return self.counters.snapshot()

    def begin(self, n_tokens: int, new_sequence: bool) -> None:
        now = time.perf_counter()
        self._close(self._fwd_end if new_sequence else now)
        phase = "prefill" if new_sequence else "decode"
        self._open = {"t0": now, "snap": self._snap(), "n_tokens": n_tokens, "phase": phase}

    def forward_done(self) -> None:
        self._fwd_end = time.perf_counter()
        if self._open is not None:
            self._open["forward_s"] = self._fwd_end - self._open["t0"]

    def finish(self) -> None:
        self._close(time.perf_counter())

    def _close(self, t_end) -> None:
        o, self._open = self._open, None
        if o is None or t_end is None:
            return
        now = self._snap()
        d = {k: now[k] - o["snap"][k] for k in now}
        total = 1e3 * (t_end - o["t0"])
        io, mem = 1e3 * d.pop("io_s"), 1e3 * d.pop("mem_s")
        self.rows.append({"step": len(self.rows), "phase": o["phase"], "n_tokens": o["n_tokens"],
                          "io_ms": io, "mem_ms": mem, "compute_ms": total - io - mem, "total_ms": total,
                          "forward_ms": 1e3 * o.get("forward_s", t_end - o["t0"]), **d,
                          "bytes_resident": int(self.resident_bytes())})

    def frame(self, since: int = 0) -> pd.DataFrame:
        """Tidy per-step table: step | phase | n_tokens | io_ms | mem_ms | compute_ms | total_ms | ...."""
        return pd.DataFrame(self.rows[since:])


def install_step_hooks(model, on_begin, on_end) -> list:
    """Forward pre/post hooks on the top-level model; ``on_begin(n_tokens, past)`` with ``past`` the
    tokens already in the KV cache (0: a new sequence).

    Refuses batch sizes above 1 (the paper's setting, and what the window assumes).
    """
    def pre(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x.shape[0] != 1:
            raise EngineError(f"flashlib runs batch size 1 (the paper's setting); got a batch of {x.shape[0]} "
                              "sequences: generate them one at a time")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        try:
            past = 0 if cache is None else int(cache.get_seq_length())
        except (AttributeError, TypeError):
            past = 0
        on_begin(int(x.shape[1]), past)

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(lambda module, args, out: on_end())]


@dataclass
class GenerationResult:
    tokens: torch.Tensor          # [1, prompt + new] token ids
    stats: pd.DataFrame           # one row per step (TokenClock.frame)

    def decode_stats(self) -> pd.DataFrame:
        return self.stats[self.stats["phase"] == "decode"]


def run_generate(runner, input_ids: torch.Tensor, gen_kwargs: dict) -> GenerationResult:
    """``model.generate`` under inference_mode with the runner's clock; clear errors, no fallback.

    ``runner``: ``model``, ``device``, ``clock``, ``before_run()`` (cold-cache protocol) and
    ``recover()`` (after an interruption).
    """
    ids = torch.as_tensor(input_ids)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] != 1:
        raise EngineError(f"batch size 1 only (the paper's setting); got {ids.shape[0]} sequences")
    kw = {"attention_mask": torch.ones_like(ids), "pad_token_id": runner.model.config.eos_token_id,
          "do_sample": False, **gen_kwargs}
    n0 = len(runner.clock.rows)
    runner.before_run()
    try:
        with torch.inference_mode():
            out = runner.model.generate(ids.to(runner.device), **kw)
    except KeyboardInterrupt:
        runner.recover()
        raise GenerationInterrupted(
            f"generation interrupted after {len(runner.clock.rows) - n0} steps; the runner was reset "
            "(partial timings are in its clock) and can generate again") from None
    finally:
        runner.clock.finish()
    return GenerationResult(out.cpu(), runner.clock.frame(since=n0))
