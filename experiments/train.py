"""Train one model: `python -m experiments.train [overrides]`, or a sweep with `-m`.

Bad input stops with one line on stderr and exit code 2, leaving no run directory behind. In a multirun a
failing member records `status: failed` in its own summary.json and the sweep goes on.
"""
import os
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from wgsef.data import DatasetNotFound
from wgsef.run import register_resolvers, run, write_json
from wgsef.train import CheckpointError, first_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("dataset", "model", "regularizer", "optimizer", "scheduler", "logger", "method", "experiment", "hparams_search")
USER_ERRORS = (ValueError, DatasetNotFound, CheckpointError)


def check_group_choices(argv: list[str]) -> None:
    """Reject `group=option` overrides naming no config file, listing the valid ones (before Hydra starts)."""
    for arg in argv:
        group, _, value = arg.lstrip("+~").partition("=")
        if group in GROUPS and value:
            valid = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
            for option in value.split(","):
                if option not in valid and option != "null":
                    raise ValueError(f"unknown {group} '{option}'; choose one of {', '.join(valid)}")


def default_method(choices) -> str:
    """The method's label from the config-group choices: wgsef.run.method_label, which scripts/_runs.py also
    uses to label a member that failed before writing its summary."""
    from wgsef.run import method_label

    return method_label(choices)


def objective(spec, summary: dict) -> float:
    """The value a sweeper maximises when the config has an `objective` node (configs/hparams_search/):
    spec.value (e.g. lambda) when the final validation accuracy is at least spec.reference - spec.max_drop,
    else minus the shortfall, so that every feasible run beats every infeasible one and, among infeasible
    runs, the one that came closer ranks higher. A diverged run counts as validation accuracy 0."""
    acc = summary["final"].get("val_acc", 0.0) if summary["status"] == "completed" else 0.0
    shortfall = spec.reference - spec.max_drop - acc
    return float(spec.value) if shortfall <= 0 else -float(shortfall)


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir, default_method(hc.runtime.choices))
    except Exception as e:
        message = first_line(e)
        if hc.mode == RunMode.MULTIRUN:  # record the failure, let the other members run
            write_json({"status": "failed", "error": message, "traceback": traceback.format_exc()},
                       run_dir / "summary.json")
            print(f"run {run_dir} failed: {message}", file=sys.stderr)
            return
        if not isinstance(e, USER_ERRORS):
            raise
        if not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if summary["status"] == "diverged" and hc.mode != RunMode.MULTIRUN:
        print(f"diverged: {summary['error']} (last good checkpoint kept in {run_dir / 'checkpoints'})",
              file=sys.stderr)
        sys.exit(1)
    return objective(cfg.objective, summary) if cfg.get("objective") is not None else None


def cli() -> None:
    """The command line: config errors (unknown option, bad override, ...) end in one line and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let composition errors reach us instead of a report
    try:
        check_group_choices(sys.argv[1:])
        main()
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
