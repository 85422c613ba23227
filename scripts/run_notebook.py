"""Execute notebooks/analysis.ipynb into a copy, leaving the tracked notebook as it is (`make notebook`).

    WGSEF_RUNS=runs/multirun/table1 python scripts/run_notebook.py [--out PATH | --inplace]

WGSEF_RUNS (default runs) and WGSEF_RESULTS (default results) are resolved from the repository root, not from
notebooks/ or the current folder; a folder that does not exist stops it with one line and exit code 2 before
the kernel starts. The executed copy goes to notebooks/executed/analysis.ipynb (not tracked) unless --inplace.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from _runs import ROOT, repo_path

NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
FOLDERS = {"WGSEF_RUNS": "runs", "WGSEF_RESULTS": "results"}


def folders(parser, environ) -> dict[str, Path]:
    """WGSEF_RUNS and WGSEF_RESULTS as absolute paths; exit 2 with one line when one is not a folder."""
    out = {}
    for name, default in FOLDERS.items():
        path = repo_path(environ.get(name), default)
        if not path.is_dir():
            given = f"{name}={environ[name]}" if environ.get(name) else f"{name} (unset: {default})"
            parser.exit(2, f"error: {given} resolves to {path}, which is not a directory; set {name} to a folder "
                           f"(relative paths are taken from {ROOT})\n")
        out[name] = path
    return out


def main(argv: list[str] | None = None, environ=os.environ) -> Path:
    """`environ`: where WGSEF_RUNS and WGSEF_RESULTS are read from; the kernel gets this process's environment
    with both set to their absolute paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=ROOT / "notebooks" / "executed" / NOTEBOOK.name,
                       help="where the executed notebook goes (default: notebooks/executed/analysis.ipynb)")
    where.add_argument("--inplace", action="store_true", help="write the outputs into the tracked notebook")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = folders(parser, environ)
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    out = NOTEBOOK if args.inplace else args.out
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    failed = None
    try:
        client.execute(env={**os.environ, **{name: str(path) for name, path in paths.items()}})
    except CellExecutionError as e:
        failed = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    if failed:
        parser.exit(1, f"error: a cell failed ({failed}); the outputs so far are in {out}\n")
    print(f"wrote {out} (runs: {paths['WGSEF_RUNS']}, results: {paths['WGSEF_RESULTS']})")
    return out


if __name__ == "__main__":
    main()
