"""Aggregate run directories into <out>/<name>.csv and .md (mean ± std over seeds), and <name>_runs.csv.

    python scripts/make_table.py runs/multirun/table1 runs/demo --name table1 [--out DIR | --force]

By default it writes into reports/ (not tracked) and refuses to replace a file there without --force; the
committed results/ is written only by the make targets, which pass --out results.

Every run directory found under the given paths is one record; completed runs are grouped by (dataset,
model, method, setting), where the setting is whatever config differs inside a (dataset, model, method)
besides the seed (a lambda or k sweep). Failed, diverged and incomplete runs are listed under the table.
<name>_runs.csv holds one row per run (seed-level numbers, for paired comparisons: compare_at_k.py).
"""
from __future__ import annotations

import argparse

from _runs import DEFAULT_OUT, TABLE_FILES, add_output_arguments, output_folder, parse_runs, write_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="table name: writes <out>/<name>.csv and .md")
    add_output_arguments(parser, DEFAULT_OUT)
    args, records, command = parse_runs(parser, "scripts/make_table.py", argv)
    out = output_folder(parser, args, DEFAULT_OUT, [f.format(args.name) for f in TABLE_FILES])
    for path in write_table(records, out / args.name, command):
        print(f"wrote {path}")
    bad = (records["status"] != "completed").sum()
    print(f"{len(records)} runs, {bad} not completed (listed in the .md)"
          + ("; no run completed: the table is empty" if bad == len(records) else ""))


if __name__ == "__main__":
    main()
