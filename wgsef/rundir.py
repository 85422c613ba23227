"""Run directories that never lose a user's files (README "Run directories").

- Names are unique per run: `${run_id:}` is the start time to the microsecond plus the process id.
- A non-empty directory is reused only to resume the same run (same resolved config, volatile keys aside),
  or with `overwrite=true`, which removes only the files a run writes (`RUN_FILES`) and keeps the rest.
- The checks run in Hydra's `on_run_start`, before Hydra creates the directory; Hydra writes no `.hydra/`
  of its own (`hydra.output_subdir: null`): the run writes it once the config is accepted. So a refused run
  changes nothing, and an error deletes only the directories this process created.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback

from wgsef.schema import ConfigError, select, validate, walk

# what a run writes into its directory; `overwrite=true` removes these and nothing else
RUN_FILES = ("config.yaml", ".hydra", "metrics.csv", "summary.json", "checkpoints", "compact.pt", "compact.json",
             "compact.onnx", "train.log", "wandb")
# keys that may change between a run and its resume without changing the run
VOLATILE = ("resume", "overwrite", "label", "trainer.progress", "trainer.num_workers", "trainer.device", "measure",
            "logger", "paths")


def run_id() -> str:
    """Config resolver `${run_id:}`: readable, sorts by time, unique across parallel launches."""
    now = datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}.{now:%f}-{os.getpid()}"


def differences(stored: dict, current: dict) -> list[str]:
    """'key: stored -> current' for every non-volatile key whose value differs."""
    def flat(c):
        return {k: v for k, v in walk(c) if not any(k == p or k.startswith(p + ".") for p in VOLATILE)}
    a, b = flat(stored), flat(current)
    return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(a.keys() | b.keys())
            if a.get(k, KeyError) != b.get(k, KeyError)]


def is_empty(d: Path) -> bool:
    return not d.exists() or not any(d.iterdir())


def failed_record(d: Path) -> bool:
    """A run that failed before training: its summary.json says so and it has no checkpoint."""
    try:
        failed = json.loads((d / "summary.json").read_text())["status"] == "failed"
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return failed and not (d / "checkpoints").exists()


def check_location(run_dir: Path, key: str) -> None:
    """The directory can be made: no file in the way and the first existing ancestor writable."""
    for parent in (run_dir, *run_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}: {parent} is a file, so the run directory {run_dir} cannot be made there")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}: {parent} is not writable, so the run directory {run_dir} cannot be "
                                  "made there; choose a writable location")
            return


def decide(run_dir: Path, c: dict) -> str:
    """'new', 'resume' or 'overwrite' for a run with resolved config `c` in `run_dir`; ConfigError otherwise."""
    if is_empty(run_dir):
        return "new"
    if failed_record(run_dir):  # a member that failed before training: the retry replaces its record
        return "overwrite"
    stored = run_dir / "config.yaml"
    if not stored.exists():
        raise ConfigError(f"run directory {run_dir} is not empty and holds no run (no config.yaml): "
                          "choose a new or empty directory; nothing was changed")
    import yaml
    diffs = differences(yaml.safe_load(stored.read_text()) or {}, c)
    if c.get("resume") and not diffs:
        return "resume"
    if c.get("overwrite"):
        return "overwrite"
    if c.get("resume"):
        raise ConfigError(f"resume=true, but {run_dir} holds a different run ({'; '.join(diffs[:3])}"
                          f"{'; ...' if len(diffs) > 3 else ''}): choose another directory, or overwrite=true "
                          "to replace that run; nothing was changed")
    raise ConfigError(f"run directory {run_dir} already holds a run: resume=true continues it, overwrite=true "
                      "replaces it (its run files only), or choose another directory; nothing was changed")


def clear_previous(run_dir: Path) -> None:
    """overwrite=true: remove the files a run writes, nothing else."""
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def claim(run_dir: Path) -> list[Path]:
    """Create the new run_dir and its missing parents; returns those this call created, deepest first. The
    leaf is created exclusively, so two processes never share a new directory."""
    missing = [run_dir, *(p for p in run_dir.parents if not p.exists())]
    for p in reversed(missing):
        try:
            p.mkdir(exist_ok=p != run_dir)
        except FileExistsError:
            raise ConfigError(f"run directory {run_dir} was just created by another process; "
                              "choose another directory") from None
    return missing


def release(created: list[Path]) -> None:
    """Remove what `claim` created: the run directory, then each parent it made if it is empty."""
    if created:
        shutil.rmtree(created[0], ignore_errors=True)
    for p in created[1:]:
        try:
            p.rmdir()
        except OSError:
            break


def location_key(hydra_cfg, c: dict) -> str:
    """The key a user changes to move the run directory: hydra.run.dir when given, else paths.runs_dir."""
    given = any(o.lstrip("+").startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    return "hydra.run.dir" if given else f"paths.runs_dir={select(c, 'paths.runs_dir')}"


class Refused(BaseException):
    """A ConfigError raised inside a Hydra callback: Hydra turns an Exception there into a warning and goes on,
    so it travels as a BaseException to the command line (experiments/train.py cli), which prints it."""


@dataclass
class State:
    """What this process decided about the directories of its runs (single runs: set before Hydra's mkdir)."""
    decisions: dict[Path, str] = field(default_factory=dict)
    created: dict[Path, list[Path]] = field(default_factory=dict)
    sweep_dir: Path | None = None


STATE = State()


class Guard(Callback):
    """Hydra callback (configs/hydra/default.yaml): checks the config and the run directory before Hydra
    creates it; remembers the sweep directory of a multirun for the final report of failed members."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            c = validate(config)
            if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 checks and claims the directory for all
                return
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            check_location(run_dir, location_key(config.hydra, c))
            existed = run_dir.exists()
            STATE.decisions[run_dir] = decide(run_dir, c)
            STATE.created[run_dir] = [] if existed else claim(run_dir)
        except ConfigError as e:
            raise Refused(e) from None

    def on_multirun_start(self, config, **kwargs) -> None:
        STATE.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        given = any(o.lstrip("+").startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        try:
            check_location(STATE.sweep_dir, "hydra.sweep.dir" if given else "paths.runs_dir")
        except ConfigError as e:
            raise Refused(e) from None
