"""Memory limits and the kernel's counters (design sec 5): cgroup-v1 memory groups, page-cache control, I/O counters.

Every method of the memory-limited benchmarks runs as its own worker process in a child of our
memory cgroup (``MemoryGroup``; io-measurements.md sec 4) whose ``memory.limit_in_bytes`` is the
DRAM budget plus that worker's own non-weight memory (``flashlib.workers``). Page cache counts as
memory there, so a limit makes the page-cache baseline behave like a device with that much DRAM.
The helpers below move pages out of the cache (``evict_files``: madvise + posix_fadvise, checked
with mincore), into it (``precache_files``: charged to the caller's group), and read what the
kernel fetched from storage (``KernelIO``: /proc/self/io read_bytes and major faults).
"""
from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .store import evict_from_page_cache, resident_fraction

RESULT_MARK = "FLASHLIB_RESULT "          # a worker's JSON line on stdout starts with this
GROUP_PREFIX = "flashlib-"                # child cgroups we create (and may remove)


# --- cgroup-v1 memory groups (io-measurements.md sec 4 and its appendix) -----------------------

class CgroupUnavailable(RuntimeError):
    """No writable cgroup-v1 memory hierarchy here (not root, v2-only, or not mounted)."""


def memory_mount() -> Path:
    """Mount point of the cgroup-v1 hierarchy that carries the memory controller (/proc/mounts)."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup" and "memory" in fields[3].split(","):
                return Path(fields[1])
    raise CgroupUnavailable("no cgroup-v1 memory hierarchy in /proc/mounts (a v2-only machine would need "
                            "memory.max in a v2 child group, which flashlib does not drive)")


def own_memory_cgroup() -> Path:
    """This process's cgroup in the v1 memory hierarchy (from /proc/self/cgroup)."""
    root = memory_mount()
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, rel = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                return root / rel.lstrip("/")
    raise CgroupUnavailable("/proc/self/cgroup names no v1 memory cgroup")


def cgroup_unavailable_reason() -> str | None:
    """None when memory child groups can be made here, else why not (tests skip with this message)."""
    try:
        probe = own_memory_cgroup() / f"{GROUP_PREFIX}probe-{os.getpid()}"
        probe.mkdir()
        try:
            (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
        finally:
            probe.rmdir()
    except CgroupUnavailable as e:
        return str(e)
    except OSError as e:
        return f"cannot create a cgroup-v1 memory child group ({e}); needs root and a writable hierarchy"
    return None


def _read_kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


class MemoryGroup:
    """A child of our own memory cgroup: optional limit, a pre-exec hook that moves a child process in
    between fork and exec (no race), usage readings, and removal. Use as a context manager.

    ``limit_bytes`` None: an accounting-only group (no limit; its peak usage is still measured).
    """

    def __init__(self, limit_bytes: int | None = None, name: str | None = None):
        parent = own_memory_cgroup()
        self.path = parent / f"{GROUP_PREFIX}{name or 'g'}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {self.path} ({e})") from e
        self.limit_bytes = limit_bytes
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))

    def enter(self) -> None:
        """``subprocess`` ``preexec_fn``: runs in the child after fork, before exec."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def read(self, name: str) -> int:
        return int((self.path / f"memory.{name}").read_text())

    def stat(self) -> dict[str, int]:
        return _read_kv(self.path / "memory.stat")

    def report(self) -> dict:
        """Limit, peak usage, failcnt (times usage hit the limit: reclaim), OOM kills, and memory.stat."""
        oom = _read_kv(self.path / "memory.oom_control")
        stat = self.stat()
        return {"limit_bytes": self.limit_bytes, "max_usage_bytes": self.read("max_usage_in_bytes"),
                "failcnt": self.read("failcnt"), "oom_kill": oom.get("oom_kill", 0),
                "under_oom": oom.get("under_oom", 0), "cache_bytes_after": stat.get("cache", 0)}

    def remove(self) -> None:
        """Uncharge what is left (force_empty) and remove the group; the tasks must have exited."""
        if not self.path.exists():
            return
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass
        for _ in range(50):                     # an exiting child can linger for a few ms
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"could not remove {self.path}: tasks {(self.path / 'cgroup.procs').read_text()!r}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def own_group_usage(reset: bool = False) -> dict:
    """Inside a worker: this process's group's peak and failcnt so far; ``reset`` restarts both from now
    (so the parent's final reading covers generation only, not model loading)."""
    g = own_memory_cgroup()
    out = {"max_usage_bytes": int((g / "memory.max_usage_in_bytes").read_text()),
           "failcnt": int((g / "memory.failcnt").read_text())}
    if reset:
        (g / "memory.max_usage_in_bytes").write_text("0")
        (g / "memory.failcnt").write_text("0")
    return out


@dataclass
class WorkerRun:
    """One worker process: its result JSON, the group's report, and the parent's memory samples."""

    returncode: int
    result: dict | None           # the worker's JSON (None if it died)
    group: dict                   # MemoryGroup.report() after exit
    samples: pd.DataFrame         # t (s since start) | usage | rss | cache | mapped_file
    wall_s: float
    stderr_tail: str
    timed_out: bool = False       # killed after ``timeout`` seconds


def run_in_group(cmd: list[str], limit_bytes: int | None, *, name: str = "worker", timeout: float = 1800,
                 poll_seconds: float = 0.05) -> WorkerRun:
    """Run ``cmd`` in a fresh memory group (limited or accounting-only), sampling usage while it runs."""
    samples: list[tuple] = []
    with MemoryGroup(limit_bytes, name) as g:
        t0 = time.time()
        proc = subprocess.Popen(cmd, preexec_fn=g.enter, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    s = g.stat()
                    samples.append((time.time(), g.read("usage_in_bytes"), s.get("rss", 0), s.get("cache", 0),
                                    s.get("mapped_file", 0)))
                except OSError:
                    pass
                done.wait(poll_seconds)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        finally:
            done.set()
            poller.join()
        wall = time.time() - t0
        report = g.report()
    result = next((json.loads(line[len(RESULT_MARK):]) for line in out.splitlines()[::-1]
                   if line.startswith(RESULT_MARK)), None)
    frame = pd.DataFrame(samples, columns=["time", "usage", "rss", "cache", "mapped_file"])
    return WorkerRun(proc.returncode, result, report, frame, wall, err[-3000:], timed_out)


# --- the kernel's I/O counters and the page cache ------------------------------------------------

def proc_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io read_bytes: page-cache
    misses with their readahead, and O_DIRECT reads; cache hits count nothing)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class KernelIO:
    """``TokenClock`` refresh for runners whose I/O hides inside page faults (page cache, accelerate):
    ``bytes_read`` = bytes the kernel fetched from storage since creation, ``reads`` = major faults."""

    def __init__(self):
        self.base = (proc_read_bytes(), major_faults())

    def __call__(self, counters) -> None:
        counters.bytes_read = proc_read_bytes() - self.base[0]
        counters.reads = major_faults() - self.base[1]


def files_resident(files) -> float:
    """Share of the files' bytes in the page cache now (mincore), size-weighted."""
    sizes = [os.path.getsize(f) for f in files]
    return float(sum(resident_fraction(f) * s for f, s in zip(files, sizes)) / max(1, sum(sizes)))


def unmap_file_pages(files) -> int:
    """Drop this process's page-table entries for every private, read-only-used mapping of ``files``
    (``madvise(MADV_DONTNEED)``; the next touch faults the page in again), so ``posix_fadvise`` can then
    evict them: a page mapped by a process stays cached. Returns the bytes of mappings dropped.

    Only for mappings nothing has written to (a written private page would be lost): model weights.
    """
    names = {str(Path(f).resolve()) for f in files}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    with open("/proc/self/maps") as fh:
        spans = [line.split() for line in fh]
    for parts in spans:
        if len(parts) >= 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if libc.madvise(ctypes.c_void_p(lo), hi - lo, 4) != 0:       # MADV_DONTNEED
                err = ctypes.get_errno()
                if err == errno.ENOMEM:      # unmapped since /proc/self/maps was read (a freed tensor): no pages left
                    continue
                raise OSError(err, f"madvise(MADV_DONTNEED) on a mapping of {parts[5]} failed")
            dropped += hi - lo
    return dropped


def evict_files(files) -> float:
    """Unmap this process's pages of the files, flush and ``posix_fadvise(DONTNEED)`` them; returns the share still
    resident (mincore) afterwards (pages another process maps cannot be evicted)."""
    unmap_file_pages(files)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)                       # dirty pages cannot be dropped
        finally:
            os.close(fd)
        evict_from_page_cache(f)
    return files_resident(files)


def precache_files(files) -> float:
    """Read every file once (into the page cache, charged to the calling process's group)."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return files_resident(files)


def precache_ranges(path: Path, ranges) -> None:
    """Read ``(offset, bytes)`` ranges of a file into the page cache (charged to the calling process's group)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in ranges:
            for o in range(off, off + n, 1 << 24):
                os.pread(fd, min(1 << 24, off + n - o), o)
    finally:
        os.close(fd)



def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc ``malloc_trim``), so a
    worker's memory after setup is what it holds, not what setup once needed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


