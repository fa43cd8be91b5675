"""Every default of flashlib, written once: frozen dataclasses and named presets.

Notebooks and the CLI override with ``dataclasses.replace``; they never restate a default.
The smoke switch (``FLASHLIB_SMOKE=1`` or a notebook's ``SMOKE = True``) selects tiny presets
so the test suite can run every code path in seconds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def smoke_mode() -> bool:
    """True when the environment asks for tiny settings (the test suite sets it)."""
    return os.environ.get("FLASHLIB_SMOKE", "").lower() in ("1", "true", "yes")


# --- corpora (corpus.py) ---------------------------------------------------------------

@dataclass(frozen=True)
class CorpusConfig:
    """The three offline text domains and how their documents are split (see ``flashlib.corpus``).

    Splits are by whole documents, in the order of a salted SHA-256 of each document's name:
    the first documents go to ``test`` until it holds ``test_fraction`` of the domain's
    characters, the next to ``validation`` likewise, the rest to ``train``.
    """
    domains: tuple[str, ...] = ("news", "shakespeare", "code")
    val_fraction: float = 0.05           # of each domain's characters (at least one document)
    test_fraction: float = 0.05
    split_salt: str = "flashlib-split-v1"
    code_max_bytes: int = 4_000_000      # stdlib sources taken as the "code" domain, in hash order
    code_max_file_bytes: int = 200_000   # skips generated giants such as pydoc_data/topics.py


CORPUS = CorpusConfig()

# --- models (models.py) ----------------------------------------------------------------

# --- flash file and store (layout.py, store.py, iobench.py) ------------------------------

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class FlashFileConfig:
    """How layout.py lays the FFN weights out on disk (paper sec 3.2, Fig 5).

    ``alignment`` is where the tensor data starts; ``row_alignment`` is the granularity of every
    row's offset and stride, so each neuron's bundle is one O_DIRECT read (offset, length and
    buffer address must be multiples of the device's DIO alignment). 4096 B is the default: it is
    the physical block here and the DIO alignment almost everywhere, and at paper scale (OPT 6.7B
    fp16: 8 KiB vectors, 16 KiB bundles) it costs no padding. This disk accepts 512 B
    (statx dio_offset_align); the "compact" preset uses it to cut padding for small models
    (SmolLM2 fp16 bundle 3456 B: 4096 pads 18.5 %, 512 pads 3.7 %). The reader checks at open
    that O_DIRECT accepts the file's stride and falls back to buffered reads if not.
    """

    alignment: int = 4096          # bytes; tensor data starts at a multiple of this
    row_alignment: int = 4096      # bytes; every row offset and the row stride are multiples
    checksum: str = "sha256"       # per-layer checksum (hashlib name)


FLASH_FILE_PRESETS = {
    "portable": FlashFileConfig(),
    "compact": FlashFileConfig(row_alignment=512),
}


@dataclass(frozen=True)
class StoreConfig:
    """Runtime reader settings (store.py): page-cache bypass and the parallel worker pool."""

    n_threads: int = 32            # paper sec 3.3: reads are spread over 32 threads
    io_mode: str = "auto"          # "auto": O_DIRECT, buffered + fadvise fallback; "direct"; "buffered"
    coalesce: bool = True          # merge reads of adjacent neuron ids into one larger read
    max_read_bytes: int = 1 * MiB  # cap on one coalesced read, so a long run still spreads over threads


@dataclass(frozen=True)
class IOBenchConfig:
    """Random-read throughput grid, chunk size x threads (paper Fig 2b), ours vs fio."""

    chunk_bytes: tuple = (4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB,
                          256 * KiB, 1 * MiB, 4 * MiB)
    threads: tuple = (1, 2, 4, 8, 16, 32)
    file_bytes: int = 4 * GiB      # random-bytes test file in paths.flash_dir()
    seconds_per_cell: float = 1.0  # per tool, per repeat
    repeats: int = 3               # repeats are the outer loop; tools alternate A B / B A
    warmup_seconds: float = 2.0    # untimed reads before the grid (first-touch memory, disk wake-up)
    use_fio: bool = True           # run fio side by side when it is installed
    keep_file: bool = False        # keep the test file for the next run (else deleted at the end)
    seed: int = 0


IOBENCH_PRESETS = {
    "full": IOBenchConfig(),
    "smoke": IOBenchConfig(chunk_bytes=(4 * KiB, 64 * KiB), threads=(1, 4), file_bytes=16 * MiB,
                           seconds_per_cell=0.1, repeats=3, warmup_seconds=0.1),
}


def iobench_config(smoke: bool | None = None) -> IOBenchConfig:
    """The smoke preset under FLASHLIB_SMOKE=1 (or smoke=True), else the full grid."""
    return IOBENCH_PRESETS["smoke" if (smoke_mode() if smoke is None else smoke) else "full"]

# --- sparsity and predictors (sparsity.py, predictor.py) ---------------------------------

# --- window, DRAM matrix, engine (window.py, dram.py, engine.py) -------------------------

# --- cost model and paper scale (costmodel.py, traces.py) --------------------------------
