"""Aggregate run directories into results/<name>.csv and .md (mean ± std over seeds), and <name>_runs.csv.

    python scripts/make_table.py runs/multirun/table1 runs/demo --name table1 [--out results]

Every run directory found under the given paths is one record; completed runs are grouped by (dataset,
model, method, setting), where the setting is whatever config differs inside a (dataset, model, method)
besides the seed (a lambda or k sweep). Failed, diverged and incomplete runs are listed under the table.
<name>_runs.csv holds one row per run (seed-level numbers, for paired comparisons: compare_at_k.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _runs import parse_runs, write_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="table name: writes <out>/<name>.csv and .md")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args, records, command = parse_runs(parser, "scripts/make_table.py", argv)
    for path in write_table(records, Path(args.out) / args.name, command):
        print(f"wrote {path}")
    runs = Path(args.out) / f"{args.name}_runs.csv"  # one row per run: the seeds that compare_at_k pairs
    with open(runs, "w", newline="") as f:
        f.write(f"# command: {command}\n")
        records.drop(columns=["config"]).sort_values(["method", "setting", "seed"]).to_csv(f, index=False)
    print(f"wrote {runs}")
    bad = (records["status"] != "completed").sum()
    print(f"{len(records)} runs, {bad} not completed (listed in the .md)"
          + ("; no run completed: the table is empty" if bad == len(records) else ""))


if __name__ == "__main__":
    main()
