"""Train one model: `python -m experiments.train [overrides]`, or a sweep with `-m`.

Bad input stops with one line on stderr and exit code 2, leaving no run directory behind. In a multirun a
failing member records `status: failed` in its own summary.json and the sweep goes on.
"""
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from wgsef.data import DatasetNotFound
from wgsef.run import run, write_json
from wgsef.train import CheckpointError

USER_ERRORS = (ValueError, DatasetNotFound, CheckpointError)


def default_method(choices) -> str:
    method = choices.get("regularizer", "none")
    return f"{method}+hspg" if choices.get("optimizer") == "hspg" else method


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run(cfg, run_dir, default_method(hc.runtime.choices))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
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


if __name__ == "__main__":
    main()
