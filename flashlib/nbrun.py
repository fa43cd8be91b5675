"""Execute the numbered notebooks (papermill-style parameters, run with nbclient).

``python -m flashlib.nbrun [--smoke] notebooks/02_flash_throughput.ipynb ...`` runs each notebook
top to bottom in a fresh kernel, after injecting ``SMOKE = True`` (and any ``-p NAME=VALUE``) below
the cell tagged ``parameters``. The executed copy goes to ``build/``; a full run that finishes is also
published, outputs kept, as ``figures/notebooks/NN_name.ipynb`` (committed, so a reader on a
code-hosting site sees every result rendered without running anything). The notebook under
``notebooks/`` is never modified, so it stays free of outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from . import paths

PARAMETERS_TAG = "parameters"


def parameters_cell_index(nb: nbformat.NotebookNode) -> int:
    """Index of the one code cell tagged ``parameters``; a clear error when there is none."""
    found = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"a notebook needs exactly one code cell tagged '{PARAMETERS_TAG}', "
                         f"found {len(found)}")
    return found[0]


def inject_parameters(nb: nbformat.NotebookNode, params: dict) -> nbformat.NotebookNode:
    """Insert an ``injected-parameters`` cell after the parameters cell (as papermill does)."""
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_cell_index(nb) + 1, cell)
    return nb


def cells_with_outputs(nb_path: Path) -> list[int]:
    """Indices of code cells that carry outputs or execution counts (committed notebooks have none)."""
    nb = nbformat.read(nb_path, as_version=4)
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]


def output_path(nb_path: Path, smoke: bool) -> Path:
    return paths.BUILD / ("smoke" if smoke else "notebooks") / Path(nb_path).name


def published_path(nb_path: Path) -> Path:
    """Where a full run's executed notebook is published for readers (``figures/notebooks/``)."""
    return paths.FIGURES / "notebooks" / Path(nb_path).name


def execute(nb_path: Path, smoke: bool, params: dict | None = None,
            timeout_s: int | None = None) -> Path:
    """Run one notebook in a fresh kernel; return the path of the executed copy in build/."""
    nb_path = Path(nb_path)
    nb = nbformat.read(nb_path, as_version=4)
    inject_parameters(nb, {"SMOKE": smoke, **(params or {})})
    out = output_path(nb_path, smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("FLASHLIB_SMOKE")
    os.environ["FLASHLIB_SMOKE"] = "1" if smoke else "0"
    try:
        client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                                resources={"metadata": {"path": str(paths.REPO)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, out)  # keep the partial run for debugging
        if not smoke:                # only a run that finished is published
            published_path(nb_path).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, published_path(nb_path))
    finally:
        if old is None:
            os.environ.pop("FLASHLIB_SMOKE", None)
        else:
            os.environ["FLASHLIB_SMOKE"] = old
    return out


def _parse_param(text: str) -> tuple[str, object]:
    import ast
    name, _, value = text.partition("=")
    if not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashlib.nbrun", description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny settings (what the tests run)")
    ap.add_argument("-p", "--param", action="append", type=_parse_param, default=[],
                    help="override a parameter, NAME=VALUE (Python literal)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    args = ap.parse_args(argv)
    for nb in args.notebooks:
        t0 = time.perf_counter()
        print(f"[nbrun] {nb} ({'smoke' if args.smoke else 'full'}) ...", flush=True)
        out = execute(nb, args.smoke, dict(args.param), args.timeout)
        print(f"[nbrun] {nb} done in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
