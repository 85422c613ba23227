"""Train one model: `python -m experiments.train [overrides]`, or a sweep with `-m`.

Bad input stops with one line on stderr and exit code 2 before any work, leaving nothing behind that this
process did not create (wgsef.schema checks the config, wgsef.rundir the run directory). A run ends with one
line on stdout: status, accuracy, sparsity, FLOPs reduction, speedup, run directory. In a multirun a failing
member records `status: failed` in its own summary.json and the sweep goes on; at the end the sweep lists
its failed members (their overrides) and exits 1. Ctrl-C / SIGTERM (exit 130 / 143) and a full disk (exit 1)
end a run with one line: where it stopped and the command that resumes it (docs/run-directories.md).
`resume=true hydra.run.dir=<run>` alone resumes: the run's own overrides are reloaded (with_run_overrides).
"""
import errno
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from wgsef.errors import CheckpointError, DatasetNotFound, first_line
from wgsef.rundir import (STATE, Refused, check_and_enter, claim_for_record, clear_previous, disk_full, leave,
                          parse, stopped)
from wgsef.run import register_resolvers, run, write_json
from wgsef.schema import GROUPS, unknown_key, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
USER_ERRORS = (ValueError, DatasetNotFound, CheckpointError)
FULL = (errno.ENOSPC, errno.EDQUOT)


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM's time limit, kill): handled like Ctrl-C."""


def check_group_choices(argv: list[str]) -> None:
    """Reject `group=option` overrides naming no config file, listing the valid ones (before Hydra starts)."""
    for arg in argv:
        group, _, value = arg.lstrip("+~").partition("=")
        if group in GROUPS and value:
            valid = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
            for option in value.split(","):
                if option not in valid and option != "null":
                    raise ValueError(f"unknown {group} '{option}'; choose one of {', '.join(valid)}")


def with_run_overrides(argv: list[str]) -> list[str]:
    """`resume=true hydra.run.dir=<run>`: the run's own overrides (.hydra/overrides.yaml) come first, those given
    now after them (and instead of the run's for the same key); resume and overwrite are never reloaded."""
    given = [a for a in argv if not a.startswith("-")]
    try:
        asked = any(o.key_or_group == "resume" and o.value() is True for o in parse(given))
    except Exception:  # a malformed override: Hydra reports it
        return argv
    if "-m" in argv or "--multirun" in argv or not asked:
        return argv
    run_dir = next((a.partition("=")[2] for a in given if a.lstrip("+").startswith("hydra.run.dir=")), None)
    stored = Path(run_dir or "") / ".hydra" / "overrides.yaml"
    if not run_dir or not stored.is_file():
        return argv
    own = [str(o) for o in OmegaConf.load(stored)]
    keys = {o.key_or_group for o in parse(given)} | {"resume", "overwrite"}
    own = [o.input_line for o in parse(own) if o.key_or_group not in keys]
    STATE.resume[Path(run_dir).absolute()] = (own, [a for a in given if not a.startswith("hydra.")])
    return [*own, *argv]


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


def one_line_summary(summary: dict, run_dir: Path) -> str:
    """The line a run prints on stdout at its end."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    def times(v):
        return "n/a" if v is None else f"{v:.2f}x"
    final = summary.get("final") or {}
    speedups = " ".join(f"{times(v)} (batch {k.rsplit('_b', 1)[1]})" for k, v in summary.items()
                        if k.startswith("speedup_cpu_b")) or "n/a"
    return (f"{summary['status']}: final test acc {pct(final.get('test_acc'))}, group sparsity "
            f"{pct(final.get('group_sparsity'))}, FLOPs reduction {times(summary.get('flops_reduction'))}, "
            f"CPU speedup {speedups}, run {run_dir}")


def save_hydra_files(run_dir: Path, cfg, hc) -> None:
    """What Hydra writes to .hydra/ (hydra.output_subdir is null so that it does not before the checks); the
    overrides include the settings an extension kept (wgsef.rundir.extend), so that a later resume finds them."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    overrides = [*hc.overrides.task, *STATE.pins.get(run_dir, [])]
    for name, node in (("config.yaml", cfg), ("hydra.yaml", {"hydra": hc}), ("overrides.yaml", overrides)):
        OmegaConf.save(node, run_dir / ".hydra" / name)


def record_member(hc, status: str, error: str | None, run_dir: Path) -> None:
    """A multirun member's outcome, for the sweep's final report (cli): one file per member in the folder that
    the sweep's process named (wgsef.rundir.Guard.on_multirun_start), wherever the member's own directory is."""
    records = os.environ.get("WGSEF_SWEEP_RECORDS")
    if records:
        Path(records).mkdir(parents=True, exist_ok=True)
        write_json({"status": status, "error": error, "overrides": list(hc.overrides.task), "run_dir": str(run_dir),
                    "sweep": Path(records).name.removeprefix(".members-")}, Path(records) / f"{hc.job.num}.json")


def record_failure(cfg, hc, run_dir: Path, message: str) -> None:
    """A failed member's summary.json (status failed), where this process may write: the sweep goes on."""
    try:
        if claim_for_record(run_dir):
            if not (run_dir / ".hydra").exists():
                save_hydra_files(run_dir, cfg, hc)
            write_json({"status": "failed", "error": message, "overrides": list(hc.overrides.task),
                        "traceback": traceback.format_exc()}, run_dir / "summary.json")
        record_member(hc, "failed", message, run_dir)
    except OSError as e:  # a full disk: the member's line on stderr is all there is
        print(f"run {run_dir}: its failure could not be recorded: {first_line(e)}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="train")
def main(cfg) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).absolute()
    multirun = hc.mode == RunMode.MULTIRUN

    def prepare():  # the config is accepted: from here on the run writes into run_dir
        if STATE.decisions.get(run_dir) == "overwrite":
            clear_previous(run_dir)
        save_hydra_files(run_dir, cfg, hc)

    try:
        if multirun:  # single runs were checked by wgsef.rundir.Guard before Hydra made the directory
            check_and_enter(cfg, validate(cfg, hc), run_dir, "hydra.sweep.dir", hc)
        summary = run(cfg, run_dir, default_method(hc.runtime.choices), prepare=prepare)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (cli): where the run stopped and how to resume it
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"{how}: {stopped(run_dir, cfg.trainer.epochs)}", file=sys.stderr)
        leave(run_dir)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as e:
        full = isinstance(e, OSError) and e.errno in FULL
        message = disk_full(run_dir, cfg.trainer.epochs) if full else first_line(e)
        if multirun:  # record the failure, let the other members run
            record_failure(cfg, hc, run_dir, message)
            leave(run_dir)
            print(f"run {run_dir} failed: {message}", file=sys.stderr)
            return
        if not full and not isinstance(e, USER_ERRORS):
            leave(run_dir)
            raise
        leave(run_dir, discard=not full)  # only what this process created, and only before any checkpoint
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1 if full else 2)
    leave(run_dir)
    if os.environ.get("RANK", "0") == "0":
        print(one_line_summary(summary, run_dir), flush=True)
    if multirun:
        record_member(hc, summary["status"], summary["error"], run_dir)
    elif summary["status"] == "diverged":
        ckpt = run_dir / "checkpoints" / "last.pt"
        kept = (f"the last good epoch's checkpoint is kept in {ckpt}" if ckpt.exists()
                else "no checkpoint was written (it diverged in the first epoch)")
        print(f"diverged: {summary['error']}; {kept}", file=sys.stderr)
        sys.exit(1)
    return objective(cfg.objective, summary) if cfg.get("objective") is not None else None


def sweep_report() -> int:
    """After a multirun (finished or stopped): list the members that failed (their overrides) on stderr and
    remove the records; 1 if any failed, else 0."""
    folder, STATE.records = STATE.records, None
    if folder is None or not folder.is_dir():
        return 0
    members = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: int(p.stem))]
    for p in folder.iterdir():  # the folder is this sweep's own
        p.unlink()
    folder.rmdir()
    failed = [m for m in members if m["status"] == "failed"]
    for m in members:
        if m["status"] != "completed":
            print(f"sweep member {' '.join(m['overrides']) or '(no overrides)'} {m['status']}: {m['error']} "
                  f"({m['run_dir']})", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(members)} sweep members failed", file=sys.stderr)
    return 1 if failed else 0


def explain(e: BaseException) -> str:
    """The one line of a command-line error; Hydra's "Could not override 'key'" says which keys there are."""
    line = first_line(e)
    match = re.match(r"Could not override '([^']+)'", line)
    return unknown_key(match.group(1)) if match else line


def terminate(signum, frame):
    raise Terminated()


def cli() -> None:
    """The command line: config errors (unknown option, bad override, ...) end in one line and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let composition errors reach us instead of a report
    STATE.records = None
    previous = signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        check_group_choices(sys.argv[1:])
        sys.argv = [sys.argv[0], *with_run_overrides(sys.argv[1:])]
        main()
    except (ValueError, HydraException, OmegaConfBaseException, Refused) as e:
        print(f"error: {explain(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:  # before a run began (main handles it inside a run)
        print("interrupted before the run began; nothing was written", file=sys.stderr)
        code = 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        failed = sweep_report()  # also when the sweep was stopped: no records left behind
        STATE.resume.clear()
    if code or failed:
        sys.exit(code or 1)


if __name__ == "__main__":
    cli()
