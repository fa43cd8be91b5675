"""Repo-relative locations of data/, figures/ and build/ (one module, so no notebook writes ``../../data``).

``FLASHLIB_FLASH_DIR`` puts the (large) flash files on another disk; ``FLASHLIB_DATA_DIR``
moves every generated cache (tests use it to work in a temporary folder).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "figures"
BUILD = REPO / "build"
NOTEBOOKS = REPO / "notebooks"


def data_dir() -> Path:
    """Root of generated caches (models, corpora, traces); git-ignored."""
    return Path(os.environ.get("FLASHLIB_DATA_DIR", REPO / "data"))


def flash_dir() -> Path:
    """Where flash files are written; put it on the disk you want to measure."""
    return Path(os.environ.get("FLASHLIB_FLASH_DIR", data_dir() / "flash"))


def models_dir() -> Path:
    return data_dir() / "models"


def corpus_dir() -> Path:
    return data_dir() / "corpus"


def figures_dir(smoke: bool) -> Path:
    """Committed figures in full mode; a throw-away folder in smoke mode (tests never touch figures/)."""
    d = BUILD / "smoke" / "figures" if smoke else FIGURES
    d.mkdir(parents=True, exist_ok=True)
    return d
