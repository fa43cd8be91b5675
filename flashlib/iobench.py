"""Flash read throughput against chunk size and threads on this disk (paper sec 2.2, Fig 2b).

Random reads of a random-bytes test file with the page cache bypassed (O_DIRECT), timed with the
store's own reader machinery (``store.open_for_reads`` + ``store.ReadPool``: what we benchmark is
what the engine uses), side by side with ``fio`` (psync engine, N jobs, one read in flight each,
i.e. the same access pattern) when fio is installed. Tools alternate within each grid cell
(A B, then B A, ...), repeats are the outer loop, and every cell is reported as median with
min-max: absolute numbers on a shared VM drift by 2x over minutes, ratios measured side by side
do not.

``run_grid`` returns one row per run; ``summarize`` turns it into the device profile that
``figures/02_flash_throughput.csv`` holds and costmodel.py reads (columns: tool, chunk_bytes,
threads, throughput_mbps, throughput_mbps_min, throughput_mbps_max, repeats, io_mode).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import paper, paths
from .config import KiB, MiB, IOBenchConfig, iobench_config
from .layout import atomic_file
from .store import IO_BUFFERED, IO_DIRECT, AlignedBuffer, ReadPool, evict_from_page_cache, \
    open_for_reads

# Batch sizing: a short untimed calibration batch (CALIBRATION_BYTES per thread, at least 2
# reads) measures the read rate; timed batches then last about BATCH_SECONDS. Every batch ends
# in a barrier (all threads idle until the caller submits again), which on this busy 2-vCPU VM
# costs a few ms of scheduling delay, so batches must be long next to that (measured at
# 32 KiB x 8 threads: 70 ms batches lost ~6 % against 280 ms ones); the per-read cost is the same.
CALIBRATION_BYTES = 2 * MiB
BATCH_SECONDS = 0.2
MAX_READS_PER_THREAD = 4096
PROFILE_COLUMNS = ["tool", "chunk_bytes", "threads", "throughput_mbps", "throughput_mbps_min",
                   "throughput_mbps_max", "repeats", "io_mode"]
ACCEPTANCE_CHUNKS = (16 * KiB, 32 * KiB, 64 * KiB)
ACCEPTANCE_THREADS = (8, 32)
ACCEPTANCE_RATIO = 0.9            # ours / fio at the acceptance points


def chunk_label(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB and n % MiB == 0 else f"{n // KiB}K"


# --- the test file ------------------------------------------------------------------------

def default_test_file(config: IOBenchConfig) -> Path:
    return paths.flash_dir() / f"iobench_{config.file_bytes // MiB}MiB.bin"


def make_test_file(path, nbytes: int, seed: int = 0, progress: bool = True) -> Path:
    """Random (incompressible) bytes; reused when a file of that size exists. Evicted afterwards."""
    path = Path(path)
    if path.exists() and path.stat().st_size == nbytes:
        evict_from_page_cache(path)
        return path
    rng = np.random.default_rng(seed)
    step = 16 * MiB
    with atomic_file(path) as f, tqdm(total=nbytes, unit="B", unit_scale=True,
                                      desc=f"create {path.name}", disable=not progress) as bar:
        for start in range(0, nbytes, step):
            f.write(rng.bytes(min(step, nbytes - start)))
            bar.update(min(step, nbytes - start))
    evict_from_page_cache(path)
    return path


# --- one run of each tool -----------------------------------------------------------------

def run_ours(path, chunk_bytes: int, threads: int, seconds: float, *, seed: int = 0,
             io_mode: str = "auto") -> dict:
    """Uniform random reads of ``chunk_bytes`` (aligned to the chunk) for ``seconds`` through a
    ReadPool of ``threads`` workers. The next batch is prepared while the current one reads."""
    fd, mode = open_for_reads(path, io_mode, probe=((0, chunk_bytes, 0),))
    pool = ReadPool(fd, threads, drop_after_read=mode == IO_BUFFERED)
    try:
        n_blocks = os.fstat(fd).st_size // chunk_bytes
        if n_blocks < 1:
            raise ValueError(f"{path} is smaller than one {chunk_bytes}-byte chunk")
        slots = AlignedBuffer(threads, chunk_bytes)                 # one destination per thread
        dest = [[slots.memoryview[t * chunk_bytes:(t + 1) * chunk_bytes]] for t in range(threads)]
        rng = np.random.default_rng(seed)

        def batch(per_thread):  # thread t's slice -> its own slot (stolen reads may share it);
            # built by C-level zip/chain: this runs while the workers read, holding the GIL
            offsets = (rng.integers(0, n_blocks, threads * per_thread) * chunk_bytes).tolist()
            return list(chain.from_iterable(
                zip(offsets[t * per_thread:(t + 1) * per_thread], repeat(dest[t]),
                    repeat(chunk_bytes)) for t in range(threads)))

        per_thread = _reads_per_thread(pool, batch, chunk_bytes, threads)
        nxt, n_bytes, n_reads = batch(per_thread), 0, 0
        t0 = time.perf_counter()
        while True:
            n_bytes += pool.submit(nxt)
            n_reads += len(nxt)
            nxt = batch(per_thread)
            pool.wait()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    finally:
        pool.close()
        os.close(fd)
    return {"tool": "flashlib", "chunk_bytes": chunk_bytes, "threads": threads,
            "throughput_mbps": n_bytes / elapsed / 1e6, "reads": n_reads, "bytes": n_bytes,
            "seconds": elapsed, "io_mode": mode}


def _reads_per_thread(pool: ReadPool, batch, chunk_bytes: int, threads: int) -> int:
    """Untimed calibration batch (also warms the threads and buffers) -> reads per thread that
    make one batch last about BATCH_SECONDS."""
    n = max(2, CALIBRATION_BYTES // chunk_bytes)
    t0 = time.perf_counter()
    pool.run(batch(n))
    rate = n / max(time.perf_counter() - t0, 1e-6)                 # reads/s per thread
    return int(min(MAX_READS_PER_THREAD, max(2, rate * BATCH_SECONDS)))


def fio_version() -> str | None:
    """fio's version string, or None when fio is not installed."""
    exe = shutil.which("fio")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "fio (unknown version)"


def fio_command(path, chunk_bytes: int, threads: int, seconds: float, direct: bool = True) -> list:
    """fio with the same access pattern as run_ours: N threads, psync, one read in flight each."""
    return ["fio", "--name=flashlib-iobench", f"--filename={path}", "--readonly",
            "--rw=randread", f"--bs={chunk_bytes}", f"--direct={int(direct)}", "--ioengine=psync",
            f"--numjobs={threads}", "--thread", "--iodepth=1", "--time_based",
            f"--runtime={max(1, round(seconds * 1000))}ms", "--randrepeat=0", "--norandommap",
            "--group_reporting", "--output-format=json"]


def parse_fio_json(text: str) -> dict:
    """Bytes, reads, seconds and throughput from fio's JSON (warnings may precede the JSON)."""
    job = json.loads(text[text.index("{"):])["jobs"][0]
    rd = job["read"]
    return {"throughput_mbps": rd["bw_bytes"] / 1e6, "reads": rd["total_ios"],
            "bytes": rd["io_bytes"], "seconds": rd["runtime"] / 1000}


def run_fio(path, chunk_bytes: int, threads: int, seconds: float, io_mode: str = IO_DIRECT) -> dict:
    cmd = fio_command(path, chunk_bytes, threads, seconds, direct=io_mode == IO_DIRECT)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return {"tool": "fio", "chunk_bytes": chunk_bytes, "threads": threads,
            **parse_fio_json(res.stdout), "io_mode": io_mode}


# --- the grid -------------------------------------------------------------------------------

def run_grid(config: IOBenchConfig | None = None, path=None, progress: bool = True) -> pd.DataFrame:
    """Every (repeat, chunk, threads, tool) run, tools alternating; one row per run.

    ``df.attrs`` records the fio version (or why fio did not run), the I/O mode, the load average
    before and after (other processes share this machine's CPUs) and the wall time.
    """
    cfg = config or iobench_config()
    path = Path(path) if path else default_test_file(cfg)
    fio = fio_version() if cfg.use_fio else None
    if cfg.use_fio and fio is None:
        warnings.warn("fio is not installed (apt-get install fio): measuring flashlib only",
                      RuntimeWarning, stacklevel=2)
    tools = ("flashlib", "fio") if fio else ("flashlib",)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    make_test_file(path, cfg.file_bytes, cfg.seed, progress)
    try:
        mode = _warm_up(path, cfg, fio is not None)
        rows = []
        for rep, chunk, threads, order in tqdm(grid_plan(cfg, tools), desc="iobench",
                                               disable=not progress):
            for tool in order:
                rows.append({"repeat": rep, **_run_one(tool, path, chunk, threads, cfg, rep,
                                                       mode)})
    finally:
        if not cfg.keep_file:
            path.unlink(missing_ok=True)
    df = pd.DataFrame(rows)
    df.attrs.update({"fio": fio or "not installed (apt-get install fio)", "io_mode": mode,
                     "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                     "cpus": os.cpu_count(), "wall_seconds": time.perf_counter() - t_start,
                     "file_bytes": cfg.file_bytes, "seconds_per_cell": cfg.seconds_per_cell})
    return df


def grid_plan(cfg: IOBenchConfig, tools=("flashlib", "fio")) -> list:
    """``(repeat, chunk, threads, tool order)`` in run order: repeats outermost, the tool order
    flipping from cell to cell (A B, B A, ...); focus cells get repeats up to ``focus_repeats``."""
    cells = [(c, t) for c in cfg.chunk_bytes for t in cfg.threads]
    focus = set(cfg.focus_cells)
    return [(rep, c, t, tools if (rep + i) % 2 == 0 else tools[::-1])
            for rep in range(max(cfg.repeats, cfg.focus_repeats))
            for i, (c, t) in enumerate(cells) if rep < cfg.repeats or (c, t) in focus]


def _warm_up(path: Path, cfg: IOBenchConfig, with_fio: bool) -> str:
    """Untimed reads: first-touch memory, thread start-up, disk wake-up. Returns our I/O mode."""
    mode = run_ours(path, 64 * KiB, 8, cfg.warmup_seconds, seed=cfg.seed + 999)["io_mode"]
    if with_fio:
        run_fio(path, 64 * KiB, 8, min(1.0, cfg.warmup_seconds), mode)
    return mode


def _run_one(tool: str, path: Path, chunk: int, threads: int, cfg: IOBenchConfig, rep: int,
             mode: str) -> dict:
    if tool == "fio":
        return run_fio(path, chunk, threads, cfg.seconds_per_cell, mode)
    seed = int(np.random.SeedSequence([cfg.seed, rep, chunk, threads]).generate_state(1)[0])
    return run_ours(path, chunk, threads, cfg.seconds_per_cell, seed=seed)


# --- tables ---------------------------------------------------------------------------------

def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """Device profile: per (tool, chunk, threads) median and min-max over repeats."""
    g = raw.groupby(["tool", "chunk_bytes", "threads"], sort=True)
    prof = g["throughput_mbps"].agg(throughput_mbps="median", throughput_mbps_min="min",
                                    throughput_mbps_max="max", repeats="count").reset_index()
    prof["io_mode"] = g["io_mode"].first().to_numpy()
    prof.attrs.update(raw.attrs)
    return prof[PROFILE_COLUMNS]


def throughput_table(profile: pd.DataFrame, tool: str = "flashlib") -> pd.DataFrame:
    """Median MB/s as chunk (rows) x threads (columns), like the tables in io-measurements.md."""
    d = profile[profile.tool == tool]
    t = d.pivot(index="chunk_bytes", columns="threads", values="throughput_mbps").round(0)
    t.index = [chunk_label(c) for c in t.index]
    t.index.name, t.columns.name = "chunk", f"{tool}: threads"
    return t


def _cell(profile: pd.DataFrame, tool: str, chunk: int, threads: int) -> float:
    hit = profile[(profile.tool == tool) & (profile.chunk_bytes == chunk)
                  & (profile.threads == threads)]
    return float(hit.throughput_mbps.iloc[0]) if len(hit) else float("nan")


def ratio_table(profile: pd.DataFrame, raw: pd.DataFrame | None = None,
                chunks=ACCEPTANCE_CHUNKS, threads=ACCEPTANCE_THREADS) -> pd.DataFrame:
    """ours / fio at the acceptance points: ratio of medians, and (with ``raw``) the median of the
    per-repeat ratios of runs measured back to back."""
    rows = []
    for c in chunks:
        for t in threads:
            ours, fio = _cell(profile, "flashlib", c, t), _cell(profile, "fio", c, t)
            if ours != ours:  # not in the grid (smoke mode)
                continue
            row = {"chunk": chunk_label(c), "threads": t, "ours_mbps": round(ours, 1),
                   "fio_mbps": round(fio, 1), "ours_over_fio": ours / fio}
            if raw is not None:
                row["paired_ratio_median"] = _paired_ratio(raw, c, t)
            row["meets_90pct"] = bool(row["ours_over_fio"] >= ACCEPTANCE_RATIO)
            rows.append(row)
    return pd.DataFrame(rows)


def _paired_ratio(raw: pd.DataFrame, chunk: int, threads: int) -> float:
    sel = raw[(raw.chunk_bytes == chunk) & (raw.threads == threads)]
    wide = sel.pivot_table(index="repeat", columns="tool", values="throughput_mbps")
    if "fio" not in wide or "flashlib" not in wide:
        return float("nan")
    return float((wide["flashlib"] / wide["fio"]).median())


def paper_rows(profile: pd.DataFrame) -> list[tuple]:
    """(quantity, paper, ours, note) rows for plotting.paper_vs_ours."""
    def gbps(chunk, threads):
        v = _cell(profile, "flashlib", chunk, threads)
        return f"{v / 1000:.2f} GB/s" if v == v else "not in grid"

    ours = profile[profile.tool == "flashlib"]
    best = ours.loc[ours.throughput_mbps.idxmax()]
    small = ours[ours.chunk_bytes == 16 * KiB]
    best16 = int(small.loc[small.throughput_mbps.idxmax(), "threads"]) if len(small) else None
    b16, u8 = _cell(profile, "flashlib", 16 * KiB, 32), _cell(profile, "flashlib", 8 * KiB, 32)
    return [
        ("sequential / large-chunk ceiling", f"{paper.SEQUENTIAL_READ_GBPS} GB/s (M1 Max, 1 GiB "
         "sequential)", f"{best.throughput_mbps / 1000:.2f} GB/s ({chunk_label(best.chunk_bytes)} "
         f"random, {best.threads} thr)", "ours: best random-read cell of the grid, "
         f"{paper.SEQUENTIAL_READ_GBPS * 1000 / best.throughput_mbps:.1f}x below the M1 Max SSD"),
        ("unbundled sparse reads (8 KiB = one OPT-6.7B fp16 vector), 32 thr",
         f"{paper.SPARSE_READ_GBPS} GB/s (Table 2)", gbps(8 * KiB, 32), "paper value is the "
         "throughput Table 2 assumes for 8 KiB reads"),
        ("bundled sparse reads (16 KiB = up+down bundle), 32 thr",
         f"{paper.BUNDLED_READ_GBPS} GB/s (Table 2)", gbps(16 * KiB, 32), ""),
        ("bundling gain (16 KiB over 8 KiB reads, 32 thr)",
         f"{paper.BUNDLED_READ_GBPS / paper.SPARSE_READ_GBPS:.2f}x",
         f"{b16 / u8:.2f}x" if b16 == b16 and u8 == u8 else "not in grid",
         "why bundling pays: below the ceiling a 2x bigger read moves more bytes per second; "
         "single cells scatter by +-20 % here"),
        (f">= {paper.USEFUL_CHUNK_KIB} KiB random reads, several threads", "useful throughput "
         "for sparse inference (sec 2.2)", f"{gbps(32 * KiB, 8)} at 8 thr, {gbps(32 * KiB, 32)} at"
         f" 32 thr", "share of our ceiling: " + (
             f"{_cell(profile, 'flashlib', 32 * KiB, 32) / best.throughput_mbps:.0%}"
             if 32 * KiB in set(ours.chunk_bytes) and 32 in set(ours.threads) else "n/a")),
        ("read threads", f"{paper.READ_THREADS}", f"best at 16 KiB: {best16}" if best16 else
         "not in grid", "more threads = more reads in flight, up to the device ceiling"),
        ("4 KiB, 2 threads", "~0.2 GB/s (Fig 2b as read by a secondary source; low confidence)",
         gbps(4 * KiB, 2), "tiny reads are latency-bound on both machines"),
    ]


# --- figure ---------------------------------------------------------------------------------

def plot_throughput(profile: pd.DataFrame):
    """Fig 2b style: throughput vs chunk size, one line per thread count (ours solid, fio
    dashed, min-max band), paper's Table 2 points; right panel: ours / fio."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    threads = sorted(profile.threads.unique())
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(threads)))
    has_fio = (profile.tool == "fio").any()
    for th, color in zip(threads, colors):
        for tool, style in (("flashlib", "-o"), ("fio", "--x")):
            d = profile[(profile.tool == tool) & (profile.threads == th)].sort_values("chunk_bytes")
            if d.empty:
                continue
            x = d.chunk_bytes / KiB
            ax.plot(x, d.throughput_mbps / 1e3, style, color=color, ms=4, lw=1.4,
                    label=f"{th} thr" if tool == "flashlib" else None)
            if tool == "flashlib":
                ax.fill_between(x, d.throughput_mbps_min / 1e3, d.throughput_mbps_max / 1e3,
                                color=color, alpha=0.07, lw=0)
        _plot_ratio(ax2, profile, th, color)
    ax.plot([8, 16], [paper.SPARSE_READ_GBPS, paper.BUNDLED_READ_GBPS], "*", color="#d62728",
            ms=11, label="paper, M1 Max (Table 2, 32 thr)")
    ax.plot([], [], "k-", label="flashlib (ours)")
    if has_fio:
        ax.plot([], [], "k--", label="fio psync")
    _chunk_axis(ax, profile)
    ax.set_ylabel("random-read throughput (GB/s)")
    ax.set_title("Flash random reads vs chunk size (paper Fig 2b), cache bypassed")
    ax.legend(fontsize=7.5, ncol=2, loc="upper right")
    ax.text(0.99, 0.02, f"paper: >= {paper.USEFUL_CHUNK_KIB} KiB reads with several threads are "
            f"useful;\n{paper.READ_THREADS} threads; {paper.SEQUENTIAL_READ_GBPS} GB/s sequential "
            "(M1 Max)", transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5,
            color="#d62728")
    _chunk_axis(ax2, profile)
    ax2.tick_params(axis="x", labelrotation=45)
    ax2.axhline(1.0, color="0.5", lw=0.8)
    ax2.axhline(ACCEPTANCE_RATIO, color="#d62728", lw=0.8, ls=":")
    ax2.set_ylabel("ours / fio (median)")
    ax2.set_title("flashlib reader vs fio, same grid")
    if not has_fio:
        ax2.text(0.5, 0.5, "fio not installed", transform=ax2.transAxes, ha="center")
    return fig


def _plot_ratio(ax, profile: pd.DataFrame, threads: int, color) -> None:
    ours = profile[(profile.tool == "flashlib") & (profile.threads == threads)]
    fio = profile[(profile.tool == "fio") & (profile.threads == threads)]
    both = ours.merge(fio, on="chunk_bytes", suffixes=("_ours", "_fio"))
    if len(both):
        ax.plot(both.chunk_bytes / KiB, both.throughput_mbps_ours / both.throughput_mbps_fio,
                "-o", color=color, ms=3.5, lw=1.2, label=f"{threads} thr")


def _chunk_axis(ax, profile: pd.DataFrame) -> None:
    chunks = sorted(profile.chunk_bytes.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks([c / KiB for c in chunks], [chunk_label(c) for c in chunks])
    ax.minorticks_off()
    ax.set_xlabel("chunk size")
