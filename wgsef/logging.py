"""Metric sinks behind one interface: CSV always, wandb on request.

`log(row)` takes one epoch's metrics, `summary(d)` the final ones, `finish()` closes the sink (one
wandb.finish() per job, so multirun works). Rows are rewritten from the checkpoint's history on resume,
so metrics.csv never holds an epoch twice. `epoch_line` is the line per epoch a run prints on stdout
(docs/metrics.md defines every column).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path


def epoch_line(row: dict, epochs: int) -> str:
    """One epoch's progress line, from values already computed at the epoch's end (no device reads):
    epoch/epochs, training loss, validation accuracy, group sparsity and nonzero groups / k where the method
    logs them, the epoch's wall time."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}", f"val acc {100 * row['val_acc']:.2f}%"]
    if "group_sparsity" in row:
        parts.append(f"group sparsity {100 * row['group_sparsity']:.1f}%")
    if "nonzero_groups" in row and row.get("k_groups"):
        parts.append(f"nonzero/k {row['nonzero_groups']}/{row['k_groups']}")
    if "mean_width" in row:  # GBLR
        parts.append(f"mean width {row['mean_width']:.3f}")
    return "  ".join([*parts, f"{row['time_s']:.1f}s"])


class NullLogger:
    """What ranks other than 0 log to in data-parallel training."""

    def __init__(self, *args, **kwargs):
        pass

    def restore(self, rows: list[dict]) -> None:
        pass

    def log(self, row: dict) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class CSVLogger(NullLogger):
    def __init__(self, run_dir: str | Path, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []

    def restore(self, rows: list[dict]) -> None:
        self.rows = [dict(r) for r in rows]
        self._write()

    def log(self, row: dict) -> None:
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as 'a/b' keys; lists and None as strings (wandb summaries hold scalars)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class WandbLogger(CSVLogger):
    """CSV plus a wandb run; offline unless `mode="online"` or WANDB_MODE says otherwise."""

    def __init__(self, run_dir: str | Path, config: dict | None = None, project: str = "wgsef",
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 mode: str = "offline", name: str | None = None):
        super().__init__(run_dir, config)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, group=group, tags=list(tags or []), name=name,
                              config=config, dir=str(run_dir), mode=os.environ.get("WANDB_MODE", mode),
                              reinit="finish_previous")

    def log(self, row: dict) -> None:
        super().log(row)
        self.run.log(row, step=int(row["epoch"]))

    def summary(self, summary: dict) -> None:
        self.run.summary.update(flatten(summary))

    def finish(self) -> None:
        self.run.finish()
