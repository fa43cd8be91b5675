"""House plot style, provenance footers and paper-vs-ours tables for every figure we commit."""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
from collections.abc import Iterable

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from . import paths  # noqa: E402

PALETTE = {"ours": "#1f77b4", "paper": "#d62728", "fio": "#7f7f7f", "baseline": "#ff7f0e"}


def apply_style() -> None:
    """One look for every figure: readable sizes, light grid, no top/right spines."""
    plt.rcParams.update({
        "figure.figsize": (7.0, 4.2), "figure.dpi": 110, "savefig.dpi": 130,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "font.size": 10, "legend.frameon": False,
    })


@functools.lru_cache(maxsize=1)
def machine_description() -> str:
    """CPU model, cores and RAM: the machine that produced a number (hostnames here are random)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram_gib:.0f} GiB RAM"


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """Short commit of the code that made a figure, with '+dirty' when the tree has changes outside
    ``figures/`` (the outputs a ``make figures`` run rewrites as it goes do not make the code dirty)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=paths.REPO, capture_output=True,
                              text=True, check=False).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "no-commit"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)figures") else "")


def provenance(io_mode: str | None = None) -> str:
    """One line naming machine, I/O mode, commit and date, printed under every figure."""
    parts = [machine_description()]
    if io_mode:
        parts.append(f"I/O: {io_mode}")
    parts += [f"flashlib {git_revision()}", _dt.date.today().isoformat()]
    return " | ".join(parts)


def save_figure(fig: plt.Figure, name: str, smoke: bool, io_mode: str | None = None):
    """Write ``name.png`` with a provenance footer to figures/ (or the smoke folder); return its path."""
    fig.text(0.01, 0.005, provenance(io_mode), fontsize=6.5, color="0.4", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = paths.figures_dir(smoke) / f"{name}.png"
    fig.savefig(out)
    return out


def save_table(df: pd.DataFrame, name: str, smoke: bool, io_mode: str | None = None):
    """Write ``name.csv`` (for code) and ``name.md`` (for the README, with provenance); return the csv path."""
    d = paths.figures_dir(smoke)
    df.to_csv(d / f"{name}.csv", index=False)
    md = df.to_markdown(index=False) if _has_tabulate() else df.to_string(index=False)
    (d / f"{name}.md").write_text(md + f"\n\n_{provenance(io_mode)}_\n")
    return d / f"{name}.csv"


def paper_vs_ours(rows: Iterable[tuple]) -> pd.DataFrame:
    """The closing table of every notebook: quantity | paper | ours | note."""
    df = pd.DataFrame(list(rows), columns=["quantity", "paper", "ours", "note"])
    return df.astype({"paper": str, "ours": str})


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def plot_breakdown(frame: pd.DataFrame, title: str):
    """Paper Fig 1: stacked bars of per-token latency (I/O, memory management, compute), one panel per
    source, paper first. ``frame``: source | method | io_ms | mem_ms | compute_ms."""
    import numpy as np
    colors = {"io_ms": "#1f77b4", "mem_ms": "#ff7f0e", "compute_ms": "#2ca02c"}
    names = {"io_ms": "flash I/O", "mem_ms": "memory management", "compute_ms": "compute"}
    sources = sorted(dict.fromkeys(frame["source"]), key=lambda x: not x.startswith("paper"))
    fig, axes = plt.subplots(1, len(sources), figsize=(3.6 * len(sources) + 1.8, 4.0), squeeze=False)
    for ax, src in zip(axes[0], sources):
        d = frame[frame["source"] == src].reset_index(drop=True)
        bottom = np.zeros(len(d))
        for c in ("io_ms", "mem_ms", "compute_ms"):
            ax.bar(d["method"], d[c], bottom=bottom, color=colors[c], label=names[c], width=0.6)
            bottom += d[c].to_numpy()
        for x, tot in enumerate(bottom):
            ax.text(x, tot, f"{tot:,.1f} ms" if tot < 100 else f"{tot:,.0f} ms", ha="center", va="bottom", fontsize=8)
        ax.set_title(src, fontsize=9)
        ax.set_ylabel("latency per token (ms)")
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.margins(y=0.12)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
