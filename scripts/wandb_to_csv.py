"""Pull a wandb project's runs into the same table as make_table.py: <out>.csv and <out>.md.

    python scripts/wandb_to_csv.py --project wgsef [--entity me] --out results/table1_wandb

The wandb run's config is the resolved Hydra config (wgsef.logging.WandbLogger) and its summary holds the
scalar entries of summary.json plus the last logged epoch metrics, so one record per run comes out of
`_runs.make_record` exactly as from a run directory.
"""
from __future__ import annotations

import argparse

from _runs import command_line, make_record, records_frame, write_table


def record_from_wandb(run) -> dict:
    """A wandb public-API run (or anything with .config, .summary_metrics, .state, .url) as a record."""
    summary = dict(run.summary_metrics or {})
    if not summary.get("status") and run.state in ("failed", "crashed"):
        summary.update(status="failed", error=f"wandb run {run.state}")
    return make_record(run.url, dict(run.config or {}), summary, f"no summary status; wandb state: {run.state}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--entity", default=None, help="default: your wandb default entity")
    parser.add_argument("--out", required=True, help="output stem: writes <out>.csv and <out>.md")
    args = parser.parse_args(argv)
    import wandb

    path = f"{args.entity}/{args.project}" if args.entity else args.project
    runs = list(wandb.Api().runs(path))
    if not runs:
        parser.exit(2, f"error: wandb project {path} has no runs\n")
    command = command_line("scripts/wandb_to_csv.py", argv)
    for written in write_table(records_frame([record_from_wandb(r) for r in runs]), args.out, command):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
