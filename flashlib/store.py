"""Reading neurons from flash (paper sec 2.2, 3.2): page-cache-bypassing parallel reads of bundles.

``FlashStore(path).read(layer, neuron_ids, out)`` fetches the listed neurons of one layer from a
flash file written by layout.py into a caller-provided aligned buffer. What makes the reads
honest and fast, per ``shared/reference/io-measurements.md``:

- O_DIRECT: no page cache, so every read goes to the device and the DRAM in use is exactly what
  the program holds. Where O_DIRECT is refused (EINVAL) we fall back to buffered reads with
  ``POSIX_FADV_RANDOM`` (no readahead) and ``POSIX_FADV_DONTNEED`` after each read, and warn;
  ``store.io_mode`` says which ran.
- A fixed pool of long-lived threads (the paper uses 32), each handed a contiguous slice of the
  batch of ``(offset, destination, length)`` reads, each calling ``os.preadv`` (which releases the
  GIL). One executor task per read costs up to ~50 % at 4 KiB; a slice per thread does not. A
  thread that finishes its slice early takes reads from the back of the longest slice left.
- Adjacent neuron ids are coalesced into one larger read (bigger chunks = more throughput, Fig 2b).

The bundled layout costs one read per neuron (or per run of adjacent neurons); the separate
layout costs one read per vector kind (2 for OPT: up row and down row, each half the size).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import operator
import os
import struct
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import layout as _layout
from .config import StoreConfig

IO_DIRECT = "o_direct"
IO_BUFFERED = "buffered+fadvise"
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_NBYTES = operator.itemgetter(2)  # a read is (offset, [destination buffers], nbytes)


class FlashFileError(Exception):
    """The flash file or its manifest is unusable (truncated, inconsistent, unreadable)."""


class FlashFormatError(FlashFileError):
    """The manifest is from another format or an incompatible format version."""


class ChecksumError(FlashFileError):
    """A layer's bytes do not match the checksum in the manifest."""


# --- aligned buffers -------------------------------------------------------------------------

class AlignedBuffer:
    """Page-aligned host memory (anonymous mmap) for ``capacity`` neuron slots of ``slot_bytes``.

    O_DIRECT needs the destination address aligned (512 B here, 4096 B portable); numpy's own
    allocations are not, an anonymous mmap is. Views: ``rows()`` [n, slot_elems], ``bundles()``
    [n, bundle_width] and ``vectors()`` {name: [n, d_model]}, numpy or torch, sharing memory.
    """

    def __init__(self, capacity: int, slot_bytes: int, dtype="uint8", vector_offsets=None,
                 d_model: int | None = None):
        self.capacity, self.slot_bytes = int(capacity), int(slot_bytes)
        self.dtype = np.dtype(dtype)
        if self.slot_bytes % self.dtype.itemsize:
            raise ValueError(f"slot_bytes={slot_bytes} is not a multiple of {self.dtype} items")
        self.nbytes = self.capacity * self.slot_bytes
        self._mmap = mmap.mmap(-1, max(self.nbytes, mmap.PAGESIZE))
        self.memoryview = memoryview(self._mmap)[:self.nbytes]
        # {vector name: byte offset inside a slot}; vectors are d_model values each
        self.vector_offsets = dict(vector_offsets or {})
        self.d_model = d_model

    @property
    def address(self) -> int:
        """Start address of the buffer (e.g. for ``cudaHostRegister``, which page-locks it)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))

    def rows(self, n: int | None = None, torch: bool = False):
        """[n, slot_bytes / itemsize] view: whole slots, padding included."""
        n = self.capacity if n is None else n
        a = np.frombuffer(self._mmap, self.dtype, count=self.nbytes // self.dtype.itemsize)
        return _maybe_torch(a.reshape(self.capacity, -1)[:n], torch)

    def vectors(self, n: int | None = None, torch: bool = False) -> dict:
        """{vector name: [n, d_model]} views into the slots (every layout)."""
        rows = self.rows(n)
        it = self.dtype.itemsize
        return {name: _maybe_torch(rows[:, off // it: off // it + self.d_model], torch)
                for name, off in self.vector_offsets.items()}

    def bundles(self, n: int | None = None, torch: bool = False):
        """[n, bundle_width] view, bundle = the vectors in file order with no gaps between them."""
        offs = list(self.vector_offsets.values())
        vec_bytes = self.d_model * self.dtype.itemsize
        if offs != [k * vec_bytes for k in range(len(offs))]:
            raise ValueError("this buffer's vectors are not adjacent (separate layout with padded "
                             "rows); use .vectors() instead of .bundles()")
        return _maybe_torch(self.rows(n)[:, :len(offs) * self.d_model], torch)


def _maybe_torch(a: np.ndarray, as_torch: bool):
    if not as_torch:
        return a
    import torch
    return torch.from_numpy(a)


# --- the worker pool -------------------------------------------------------------------------

class ReadPool:
    """``n_threads`` long-lived threads reading batches of ``(offset, [buffers], nbytes)``.

    A batch is split into at most ``n_threads`` contiguous slices of about equal bytes; each
    thread runs a tight ``os.preadv`` loop over its own slice, front to back. A thread that
    finishes early takes reads from the back of the longest remaining slice (``steal``), so the
    batch ends when the device is done, not when the unluckiest thread is: without it every
    batch pays a tail of idle threads (measured: ~10 % at 16 KiB x 32 threads). Slices are
    deques, whose popleft/pop are atomic in CPython, so neither side takes a lock.
    ``submit`` returns at once (the caller can prepare the next batch or compute); ``wait``
    blocks until the batch is done and re-raises the first error. iobench.py measures
    throughput with this same class. ``run`` (synchronous) makes the calling thread one more
    reader: it takes the first slice itself and wakes a worker only for the others, so a batch
    of one read never leaves the caller. Waking a worker costs about what a 4 KiB O_DIRECT read
    does on this machine (one 2 KiB bundle: 116 us through the pool vs 65 us inline, measured),
    and the engine's per-layer batches are mostly one to a few reads. So ``run`` wakes a worker
    only per ``min_slice_bytes`` of the batch (16 KiB: for 2 KiB reads, 8 per slice was the
    fastest of 1/2/4/8/16 per slice at 4-256 reads; large reads still get one thread each).
    """

    def __init__(self, fd: int, n_threads: int, *, drop_after_read: bool = False,
                 steal: bool = True, min_slice_bytes: int = 16 * 1024):
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        self.fd, self.n_threads = fd, n_threads
        self.min_slice_bytes = min_slice_bytes
        self.drop_after_read, self.steal = drop_after_read, steal
        self._start = [threading.Semaphore(0) for _ in range(n_threads)]
        self._done = threading.Semaphore(0)
        self._queues: list = [deque() for _ in range(n_threads + 1)]   # the last one: run()'s caller
        self._errors: list = [None] * n_threads
        self._pending = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"flashlib-read-{i}") for i in range(n_threads)]
        for t in self._threads:
            t.start()

    def _worker(self, i: int) -> None:
        start, mine = self._start[i], self._queues[i]
        while True:
            start.acquire()
            if self._closed:
                return
            try:
                self._drain(mine)
                while self.steal:
                    victim = max(self._queues, key=len)
                    if not victim:
                        break
                    self._drain(victim, steal=True)
            except BaseException as e:  # handed to the caller by wait()
                self._errors[i] = e
                for q in self._queues:  # stop the batch early: nothing else will be read
                    q.clear()
            finally:
                self._done.release()

    def _drain(self, queue: deque, steal: bool = False) -> None:
        """Read from the front of ``queue`` until it is empty, or one read from its back."""
        fd, preadv, drop = self.fd, os.preadv, self.drop_after_read
        pop = queue.pop if steal else queue.popleft
        while True:  # the hot loop: keep it to a pop, a preadv and a compare
            try:
                offset, bufs, nbytes = pop()
            except IndexError:
                return
            got = preadv(fd, bufs, offset)
            if got != nbytes:
                raise FlashFileError(f"short read at offset {offset}: got {got} of {nbytes} "
                                     "bytes (file truncated?)")
            if drop:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
            if steal:
                return

    def submit(self, reads: list) -> int:
        """Start a batch; returns its byte count. One batch at a time (call ``wait`` first)."""
        if self._closed:
            raise RuntimeError("ReadPool is closed")
        if self._pending:
            raise RuntimeError("ReadPool.submit: the previous batch was not waited for")
        sizes = list(map(_NBYTES, reads))  # C-level loops: the workers may be idle meanwhile
        bounds = _balanced_slices(sizes, self.n_threads)
        n_slices = len(bounds) - 1
        for t in range(n_slices):  # fill every slice before waking anyone (thieves look at all)
            self._queues[t].extend(reads[bounds[t]:bounds[t + 1]])
        for t in range(n_slices):
            self._start[t].release()
        self._pending = n_slices
        return sum(sizes)

    def wait(self) -> None:
        """Block until the submitted batch is read; raise the first worker error, if any."""
        for _ in range(self._pending):
            self._done.acquire()
        self._pending = 0
        errors = [e for e in self._errors if e is not None]
        self._errors = [None] * self.n_threads
        if errors:
            raise errors[0]

    def run(self, reads: list) -> int:
        """Read a whole batch, the calling thread included; returns the bytes read."""
        if self._closed:
            raise RuntimeError("ReadPool is closed")
        if self._pending:
            raise RuntimeError("ReadPool.run: a submitted batch was not waited for")
        if not reads:
            return 0
        sizes = list(map(_NBYTES, reads))
        total = sum(sizes)
        bounds = _balanced_slices(sizes, min(self.n_threads + 1, max(1, total // self.min_slice_bytes)))
        mine = self._queues[-1]
        mine.extend(reads[bounds[0]:bounds[1]])
        workers = len(bounds) - 2                  # slices after the caller's, one worker each
        for t in range(workers):
            self._queues[t].extend(reads[bounds[t + 1]:bounds[t + 2]])
        for t in range(workers):
            self._start[t].release()
        self._pending = workers
        try:
            self._drain(mine)
            while self.steal and workers:
                victim = max(self._queues, key=len)
                if not victim:
                    break
                self._drain(victim, steal=True)
        except BaseException:
            for q in self._queues:                 # stop the batch: nothing else will be read
                q.clear()
            try:
                self.wait()
            except Exception:
                pass
            raise
        self.wait()
        return total

    def close(self) -> None:
        if self._closed:
            return
        if self._pending:
            try:
                self.wait()
            except Exception:
                pass
        self._closed = True
        for sem in self._start:
            sem.release()
        for t in self._threads:
            t.join()


def _balanced_slices(sizes: list, n_slices: int) -> list:
    """Bounds of <= n_slices contiguous, non-empty slices of about equal total size."""
    n = len(sizes)
    k = min(n_slices, n)
    if k == 0:
        return [0]
    if k == n or min(sizes) == max(sizes):
        return [n * t // k for t in range(k + 1)]
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="left") + 1
    return sorted(set([0, *np.minimum(cuts, n).tolist(), n]))


# --- opening a file for reads ----------------------------------------------------------------

def open_for_reads(path, io_mode: str = "auto", probe: tuple = ()) -> tuple[int, str]:
    """Open ``path`` with O_DIRECT if possible; returns ``(fd, io_mode)``.

    ``probe`` lists ``(offset, length, buffer_offset)`` reads that must work (the real read
    geometry): O_DIRECT can open fine and still refuse a read with EINVAL when the offset,
    length or buffer address is below the device's alignment. In ``auto`` mode any refusal
    falls back to buffered reads (with a warning); ``direct`` raises instead.
    """
    if io_mode not in ("auto", "direct", "buffered"):
        raise ValueError(f"io_mode must be 'auto', 'direct' or 'buffered', got {io_mode!r}")
    if io_mode != "buffered":
        try:
            return _open_direct(path, probe), IO_DIRECT
        except OSError as e:
            if io_mode == "direct" or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"{path}: O_DIRECT refused ({e.strerror}); using buffered reads with "
                          "posix_fadvise(DONTNEED) after each read", RuntimeWarning, stacklevel=3)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: read only what we ask
    return fd, IO_BUFFERED


def _open_direct(path, probe: tuple) -> int:
    """O_DIRECT open plus the probe reads; closes the fd again if any of them is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        if probe:
            buf = AlignedBuffer(1, max(b + n for _, n, b in probe))
            for offset, length, buf_offset in probe:
                os.preadv(fd, [buf.memoryview[buf_offset:buf_offset + length]], offset)
    except OSError:
        os.close(fd)
        raise
    return fd


# --- page cache: eviction and residency (cold-cache protocol) ---------------------------------

def evict_from_page_cache(path) -> None:
    """``posix_fadvise(DONTNEED)`` on the whole file: drops its clean, unmapped cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path) -> float:
    """Fraction of the file's pages in the page cache (mmap + mincore through libc)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    n_pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n_pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return float((np.frombuffer(vec, np.uint8) & 1).sum()) / n_pages


# --- the store -------------------------------------------------------------------------------

@dataclass
class IOCounters:
    """What the store has read since the last reset (the paper's per-token I/O accounting)."""

    reads: int = 0           # preadv calls issued
    bytes_read: int = 0      # bytes transferred from the device (row padding included)
    neurons: int = 0         # neuron slots filled
    io_seconds: float = 0.0  # wall time spent inside read()


class FlashStore:
    """Runtime reader of a flash file (bundled or separate layout) written by layout.py.

    Usage::

        with FlashStore(path) as store:
            buf = store.new_buffer(max_neurons)
            store.read(layer, ids, buf)                 # one batch of parallel preadv calls
            v = buf.vectors(len(ids))                   # {"up": [n, d_model], "down": ...}
    """

    def __init__(self, path, config: StoreConfig = StoreConfig(), *, io_mode: str | None = None):
        self.path = Path(path)
        self.config = config
        self.manifest = m = _load_manifest(self.path)
        self.layout, self.dtype = m["layout"], np.dtype(m["dtype"])
        self.n_layers, self.d_model, self.d_ffn = m["n_layers"], m["d_model"], m["d_ffn"]
        self.vector_names = tuple(m["vector_names"])
        self.bundle_width, self.row_stride = m["bundle_width"], m["row_stride"]
        # bytes of one neuron in a buffer: the bundle row, or one padded row per vector kind
        n_rows = 1 if self.layout == "bundled" else len(self.vector_names)
        self.slot_bytes = n_rows * self.row_stride
        vec_bytes = self.d_model * self.dtype.itemsize
        self._vector_offsets = {name: (k * vec_bytes if self.layout == "bundled"
                                       else k * self.row_stride)
                                for k, name in enumerate(self.vector_names)}
        _check_file(self.path, m)
        self.fd, self.io_mode = open_for_reads(self.path, io_mode or config.io_mode,
                                               probe=self._probe())
        self._pool = ReadPool(self.fd, config.n_threads,
                              drop_after_read=self.io_mode == IO_BUFFERED)
        self._lock = threading.Lock()
        self.counters = IOCounters()

    def _probe(self) -> tuple:
        """Two rows, at the stride, into slot-aligned buffer positions: the real read geometry."""
        first = self.manifest["layers"][0]["offset"]
        rows = min(2, self.d_ffn)
        return tuple((first + r * self.row_stride, self.row_stride, r * self.row_stride)
                     for r in range(rows))

    # -- buffers and reads --
    def new_buffer(self, capacity: int) -> AlignedBuffer:
        """An aligned buffer with room for ``capacity`` neurons of this file."""
        return AlignedBuffer(capacity, self.slot_bytes, self.dtype, self._vector_offsets,
                             self.d_model)

    def read(self, layer: int, neuron_ids, out) -> int:
        """Read the given neurons of ``layer``: slot j of ``out`` gets neuron ``neuron_ids[j]``.

        ``out`` is an AlignedBuffer from ``new_buffer`` (or an aligned, C-contiguous
        [>= n, slot_bytes / itemsize] array of the file dtype). Returns the bytes read.
        """
        ids = self._check_ids(layer, neuron_ids)
        dest = self._dest(out, len(ids))
        reads = self._plan(layer, ids, dest)
        with self._lock:
            t0 = time.perf_counter()
            nbytes = self._pool.run(reads)
            c = self.counters
            c.io_seconds += time.perf_counter() - t0
            c.reads += len(reads)
            c.bytes_read += nbytes
            c.neurons += len(ids)
        return nbytes

    def reset_counters(self) -> IOCounters:
        """Return the counters so far and start new ones."""
        old, self.counters = self.counters, IOCounters()
        return old

    def _check_ids(self, layer: int, neuron_ids) -> np.ndarray:
        if not 0 <= int(layer) < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers}) for {self.path}")
        if hasattr(neuron_ids, "detach"):
            neuron_ids = neuron_ids.detach().cpu().numpy()
        ids = np.asarray(neuron_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"neuron_ids must be a 1-D integer sequence, got shape {ids.shape} "
                            f"dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        bad = ids[(ids < 0) | (ids >= self.d_ffn)]
        if bad.size:
            raise IndexError(f"neuron id {int(bad[0])} out of range [0, {self.d_ffn}) for layer "
                             f"{layer} of {self.path} ({bad.size} bad ids)")
        return ids

    def _dest(self, out, n: int) -> memoryview:
        """Validate ``out`` and return it as a flat byte memoryview of >= n slots."""
        if isinstance(out, AlignedBuffer):
            if out.slot_bytes != self.slot_bytes or out.dtype != self.dtype:
                raise ValueError(f"buffer slots are {out.slot_bytes} B of {out.dtype}, this file "
                                 f"needs {self.slot_bytes} B of {self.dtype}; use "
                                 "store.new_buffer()")
            if out.capacity < n:
                raise ValueError(f"buffer holds {out.capacity} neurons, {n} requested")
            return out.memoryview
        if hasattr(out, "detach"):
            out = out.detach().numpy()
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be an AlignedBuffer or numpy/torch array, got {type(out)}")
        slot_elems = self.slot_bytes // self.dtype.itemsize
        if out.dtype != self.dtype or out.ndim != 2 or out.shape[1] != slot_elems \
                or out.shape[0] < n:
            raise ValueError(f"out must be [>= {n}, {slot_elems}] {self.dtype}, got "
                             f"{list(out.shape)} {out.dtype}; use store.new_buffer()")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be C-contiguous and writeable")
        if self.io_mode == IO_DIRECT and out.ctypes.data % self.manifest["row_alignment"]:
            raise ValueError(f"out is not {self.manifest['row_alignment']}-byte aligned, which "
                             "O_DIRECT needs; use store.new_buffer()")
        return memoryview(out).cast("B")

    def _plan(self, layer: int, ids: np.ndarray, dest: memoryview) -> list:
        """The batch of ``(offset, [destination views], nbytes)`` reads for these ids."""
        tensors = self.manifest["layers"][layer]["tensors"]
        stride, slot = self.row_stride, self.slot_bytes
        max_rows = max(1, self.config.max_read_bytes // stride) if self.config.coalesce else 1
        if self.layout == "separate":
            max_rows = min(max_rows, IOV_MAX)
        if len(ids) <= _SMALL_BATCH:  # the engine's usual case: a few ids, plain Python is cheaper
            starts, ends, first_ids = _runs_small(ids.tolist(), max_rows)
        else:
            starts, ends = _runs(ids, max_rows)
            first_ids, starts, ends = ids[starts].tolist(), starts.tolist(), ends.tolist()
        reads = []
        for k, kind in enumerate(tensors):
            base = tensors[kind]["offset"]
            vec0 = k * stride  # separate: vector k sits at k*stride inside the slot
            for s, e, i in zip(starts, ends, first_ids):
                if self.layout == "bundled":
                    bufs = [dest[s * slot:e * slot]]
                else:
                    bufs = [dest[j * slot + vec0:j * slot + vec0 + stride] for j in range(s, e)]
                reads.append((base + i * stride, bufs, (e - s) * stride))
        return reads

    # -- integrity and page cache --
    def verify(self, progress: bool = False) -> None:
        """Recompute every layer's checksum from disk; raise ChecksumError naming the bad layers."""
        algo = self.manifest["checksum_algorithm"]
        chunk = max(self.row_stride, (8 << 20) // self.row_stride * self.row_stride)
        buf = AlignedBuffer(1, chunk)
        bad = []
        for entry in tqdm(self.manifest["layers"], desc=f"verify {self.path.name}",
                          disable=not progress):
            digest = hashlib.new(algo)
            off, end = entry["offset"], entry["offset"] + entry["nbytes"]
            with self._lock:
                while off < end:
                    n = min(chunk, end - off)
                    self._pool.run([(off, [buf.memoryview[:n]], n)])
                    digest.update(buf.memoryview[:n])
                    off += n
            if digest.hexdigest() != entry["checksum"]:
                bad.append(entry["index"])
        if bad:
            raise ChecksumError(f"{self.path}: layer(s) {bad} fail their {algo} checksum "
                                "(file corrupted or changed since it was written); rewrite it")

    def evict(self) -> None:
        """Drop this file from the page cache (cold-cache protocol for buffered baselines)."""
        evict_from_page_cache(self.path)

    def resident_fraction(self) -> float:
        """Fraction of this file's pages in the page cache (0 under O_DIRECT reads)."""
        return resident_fraction(self.path)

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
            self._pool = None
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"FlashStore({str(self.path)!r}, layout={self.layout}, dtype={self.dtype}, "
                f"layers={self.n_layers}, d_ffn={self.d_ffn}, io_mode={self.io_mode})")


_SMALL_BATCH = 32


def _runs_small(ids: list, max_rows: int) -> tuple[list, list, list]:
    """``_runs`` for a short list of ids: (starts, ends, first id of each run), plain lists."""
    starts, firsts = [], []
    prev, start = None, 0
    for j, i in enumerate(ids):
        if prev is None or i != prev + 1 or j - start >= max_rows:
            starts.append(j)
            firsts.append(i)
            start = j
        prev = i
    return starts, starts[1:] + [len(ids)] if ids else [], firsts


def _runs(ids: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/end positions (in ``ids``) of runs of consecutive ids, at most ``max_rows`` long."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if max_rows == 1:
        starts = np.arange(n)
    else:
        starts = np.concatenate(([0], np.flatnonzero(np.diff(ids) != 1) + 1))
        lengths = np.diff(np.append(starts, n))
        if (lengths > max_rows).any():
            starts = np.concatenate([np.arange(s, s + ln, max_rows)
                                     for s, ln in zip(starts.tolist(), lengths.tolist())])
    return starts, np.append(starts[1:], n)


def _load_manifest(path: Path) -> dict:
    mpath = _layout.manifest_path(path)
    if not path.exists():
        raise FileNotFoundError(f"flash file {path} does not exist")
    if not mpath.exists():
        raise FlashFileError(f"{path} has no manifest {mpath.name}; it was not written by "
                             "flashlib.layout.write_flash_file (or the write did not finish)")
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlashFormatError(f"manifest {mpath} is not valid UTF-8 JSON ({type(e).__name__}: {e}); {_FIX}") from None
    if m.get("format") != _layout.FORMAT:
        raise FlashFormatError(f"{mpath} is not a flashlib flash manifest "
                               f"(format={m.get('format')!r})")
    if m.get("format_version") != _layout.FORMAT_VERSION:
        raise FlashFormatError(f"{mpath} has format version {m.get('format_version')!r}; this "
                               f"flashlib reads version {_layout.FORMAT_VERSION}: rewrite the "
                               "file with flashlib.layout.write_flash_file")
    return m


_FIX = "rewrite it with flashlib.layout.write_flash_file (or delete it and its manifest so flashlib writes them again)"


def _damaged(path: Path, field: str, what: str) -> FlashFileError:
    return FlashFileError(f"{path}: {field}: {what}; the file or its manifest is damaged: {_FIX}")


def _check_manifest(path: Path, m: dict) -> None:
    """The manifest agrees with itself: every derived field is what its geometry gives."""
    need = ("layout", "dtype", "n_layers", "d_model", "d_ffn", "vector_names", "bundle_width", "row_alignment",
            "row_bytes", "row_stride", "row_padding", "matrix_bytes", "data_offset", "file_bytes", "layers")
    missing = [k for k in need if k not in m]
    if missing:
        raise _damaged(path, f"manifest fields {missing}", "missing")
    if m["layout"] not in _layout.LAYOUTS:
        raise _damaged(path, "manifest layout", f"{m['layout']!r} is not one of {_layout.LAYOUTS}")
    if m["dtype"] not in _layout.DTYPES:
        raise _damaged(path, "manifest dtype", f"{m['dtype']!r} is not one of {tuple(_layout.DTYPES)}")
    n_vec, item = len(m["vector_names"]), np.dtype(m["dtype"]).itemsize
    kinds = 1 if m["layout"] == "bundled" else n_vec
    want = {"bundle_width": n_vec * m["d_model"],
            "row_bytes": (n_vec if m["layout"] == "bundled" else 1) * m["d_model"] * item}
    want["row_stride"] = _layout.round_up(want["row_bytes"], m["row_alignment"])
    want.update(row_padding=want["row_stride"] - want["row_bytes"], matrix_bytes=m["d_ffn"] * want["row_stride"])
    want["file_bytes"] = m["data_offset"] + m["n_layers"] * kinds * want["matrix_bytes"]
    for k, v in want.items():
        if m[k] != v:
            raise _damaged(path, f"manifest {k}", f"{m[k]!r}, but layout {m['layout']!r}, d_model {m['d_model']}, "
                           f"d_ffn {m['d_ffn']}, {n_vec} vectors of {m['dtype']} and row alignment "
                           f"{m['row_alignment']} give {v!r}")
    if len(m["layers"]) != m["n_layers"]:
        raise _damaged(path, "manifest layers", f"{len(m['layers'])} entries for n_layers {m['n_layers']}")


def _read_header(path: Path, m: dict) -> dict:
    """The file's safetensors header (8-byte length, JSON), or a FlashFileError naming what is wrong."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _damaged(path, "safetensors header length", f"the file has only {len(raw)} bytes")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n != m["data_offset"]:
            raise _damaged(path, "safetensors header length", f"the header ends at {8 + n}, the manifest's "
                           f"data_offset is {m['data_offset']} (manifest from another file?)")
        text = f.read(n)
        os.posix_fadvise(f.fileno(), 0, 8 + n, os.POSIX_FADV_DONTNEED)  # leave no page cached
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, "safetensors header", f"not valid UTF-8 JSON ({type(e).__name__}: {e})") from None


def _check_file(path: Path, m: dict) -> None:
    """The file is as long as the manifest says, the manifest agrees with itself, and the safetensors
    header agrees with the manifest: every tensor's name, dtype, shape and offset."""
    _check_manifest(path, m)
    size = path.stat().st_size
    if size < m["file_bytes"]:
        raise FlashFileError(f"{path} is truncated: {size} bytes, the manifest expects "
                             f"{m['file_bytes']}; {_FIX}")
    header = _read_header(path, m)
    meta = header.get("__metadata__", {})
    if meta.get("layout", m["layout"]) != m["layout"]:
        raise _damaged(path, "manifest layout", f"{m['layout']!r}, the safetensors header says {meta['layout']!r}")
    shape = [m["d_ffn"], m["row_stride"] // np.dtype(m["dtype"]).itemsize]
    kinds = ("bundles",) if m["layout"] == "bundled" else tuple(m["vector_names"])
    for entry in m["layers"]:
        if set(entry["tensors"]) != set(kinds):
            raise _damaged(path, f"manifest layer {entry['index']} tensors", f"{sorted(entry['tensors'])}, the "
                           f"{m['layout']} layout of {m['vector_names']} has {list(kinds)}")
        for t in entry["tensors"].values():
            h = header.get(t["name"])
            if h is None:
                raise _damaged(path, f"tensor {t['name']}", "not in the safetensors header (manifest from another file?)")
            if h.get("dtype") != _layout.DTYPES[m["dtype"]]:
                raise _damaged(path, f"tensor {t['name']} dtype", f"{h.get('dtype')!r} in the header, the manifest's "
                               f"dtype {m['dtype']!r} is {_layout.DTYPES[m['dtype']]!r}")
            if list(h.get("shape", [])) != shape:
                raise _damaged(path, f"tensor {t['name']} shape", f"{h.get('shape')} in the header, the manifest's "
                               f"d_ffn and row_stride give {shape}")
            start = (h.get("data_offsets") or [None])[0]
            if not isinstance(start, int) or m["data_offset"] + start != t["offset"]:
                raise _damaged(path, f"tensor {t['name']} offset", f"not where the manifest says ({t['offset']}; "
                               "manifest from another file?)")
