"""Run directories that never lose a user's files (docs/run-directories.md).

- Names are unique per run: `${run_id:}` is the start time to the microsecond plus the process id.
- A run claims its directory before it writes anything: it creates the run marker `.wgsef-run` (O_EXCL when
  new) and holds an exclusive lock on it (flock) while it runs, so a second run into the same directory is
  refused however close the two starts are; the marker names the process that holds it, and a claim left by
  a killed process is recognised (the lock died with it) and taken over with a note.
- A directory that holds files is reused only to resume the same run (same resolved config, volatile keys
  aside, or a longer `trainer.epochs`), or with `overwrite=true` where the run marker says a run of this
  project wrote it; overwrite removes the files a run writes (`RUN_FILES`, by name) and keeps the rest.
- The checks run in Hydra's `on_run_start`, before Hydra creates the directory; Hydra writes no `.hydra/`
  of its own (`hydra.output_subdir: null`): the run writes it once the config is accepted. So a refused run
  changes nothing, and an error deletes only the directories this process created.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback

from wgsef.schema import ConfigError, finish_at_start, is_int, resolve, select, validate, walk

MARKER = ".wgsef-run"  # the run marker: this project's run wrote the directory; locked while a run is in it
# what a run writes into its directory (globs); `overwrite=true` removes these and nothing else
RUN_FILES = ("config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "metrics.csv",
             "metrics.csv.tmp", "summary.json", "summary.json.tmp", "checkpoints/last.pt", "checkpoints/last.pt.tmp",
             "compact.pt", "compact.json", "compact.onnx", "wandb/latest-run", "wandb/run-*", "wandb/offline-run-*",
             "wandb/debug.log", "wandb/debug-internal.log")
TEMPORARY = tuple(f for f in RUN_FILES if f.endswith(".tmp"))
# keys that may change between a run and its resume without changing the run
VOLATILE = ("resume", "overwrite", "label", "trainer.progress", "trainer.num_workers", "trainer.device", "measure",
            "logger", "paths")
RESUME = "python -m experiments.train resume=true hydra.run.dir={}"


def run_id() -> str:
    """Config resolver `${run_id:}`: readable, sorts by time, unique across parallel launches."""
    now = datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}.{now:%f}-{os.getpid()}"


def volatile(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in VOLATILE)


def differences(stored: dict, current: dict) -> list[str]:
    """The non-volatile keys whose value differs between two resolved configs."""
    a, b = ({k: v for k, v in walk(c) if not volatile(k)} for c in (stored, current))
    return [k for k in sorted(a.keys() | b.keys()) if a.get(k, KeyError) != b.get(k, KeyError)]


def is_empty(d: Path) -> bool:
    """No file but (perhaps) the run marker: a claim that never wrote anything."""
    return not d.exists() or all(p.name == MARKER for p in d.iterdir())


def failed_record(d: Path) -> bool:
    """A run that failed before training: marked, its summary.json says so, and it has no checkpoint."""
    try:
        failed = json.loads((d / "summary.json").read_text())["status"] == "failed"
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return failed and (d / MARKER).exists() and not (d / "checkpoints" / "last.pt").exists()


def stored_config(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


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


# -- resume: the user's overrides against the run's own -----------------------------------------------
def parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def changed_overrides(run_dir: Path, stored: dict, c: dict) -> list[str]:
    """The overrides given now (besides the run's own, STATE.resume) that change the run, each with the
    run's value."""
    import yaml

    own, given = STATE.resume.get(run_dir, ([], []))
    theirs = {o.key_or_group: o.value() for o in parse(own) if not o.is_delete()}
    try:
        choices = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        choices = {}
    out = []
    for o in parse(given):
        key = o.key_or_group
        if volatile(key) or key.startswith("hydra") or o.is_delete():
            continue
        if key == "trainer.epochs" and is_int(o.value()) and o.value() > select(stored, key, 0):
            continue  # an extension: allowed
        run_value = theirs.get(key, choices.get(key) if key in choices else select(stored, key, "(absent)"))
        if str(o.value()) != str(run_value):
            out.append(f"{o.input_line} (the run has {key}={'null' if run_value is None else run_value})")
    return out


def refuse_resume(run_dir: Path, stored: dict, c: dict, diffs: list[str]) -> ConfigError:
    changed = changed_overrides(run_dir, stored, c)
    if changed:
        return ConfigError(f"resume=true, but {'; '.join(changed)} would change the run in {run_dir}: leave "
                           f"{'it' if len(changed) == 1 else 'them'} out to resume it as it was (its own overrides "
                           "are reloaded), or start a new run in another directory; nothing was changed")
    shown = "; ".join(f"{k}: {select(stored, k, '(absent)')} -> {select(c, k, '(absent)')}" for k in diffs[:3])
    return ConfigError(f"resume=true, but the run in {run_dir} was made with other settings than its overrides give "
                       f"with this code ({shown}{'; ...' if len(diffs) > 3 else ''}): resume it with the code that "
                       "started it, or start a new run in another directory; nothing was changed")


def settings(node: dict, prefix: str = ""):
    """(dotted key, value) of every setting, a list being one value (as an override sets it)."""
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from settings(v, key)
        else:
            yield key, v


def extend(config, run_dir: Path, c: dict, hydra=None) -> dict:
    """resume=true with a larger trainer.epochs: the run continues past its end. Every setting that follows
    trainer.epochs (a finish or switch epoch at a fraction of the run, ...) keeps the run's value: the
    schedule the run followed stays as it was, and the extra epochs continue its last phase. A cosine
    learning rate, which would climb back up past T_max, and GBLR, whose sigma schedule spans the run,
    cannot be extended so. Sets those keys in `config` (Hydra's, before the run) and returns the new `c`."""
    import copy

    from omegaconf import OmegaConf, open_dict, read_write

    STATE.pins.pop(run_dir, None)
    stored = stored_config(run_dir) if c.get("resume") else None
    old, new = select(stored or {}, "trainer.epochs"), c["trainer"]["epochs"]
    if not (is_int(old) and new > old):
        return c
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
        task.trainer.epochs = old
    at_own_length = resolve(task)
    now = dict(settings(c))
    pins = {k: v for k, v in settings(at_own_length) if k != "trainer.epochs" and not volatile(k) and now.get(k) != v}
    scheduler, regularizer = c.get("scheduler") or {}, c.get("regularizer") or {}
    if str(scheduler.get("_target_", "")).endswith("CosineAnnealingLR") and \
            pins.get("scheduler.T_max", scheduler.get("T_max", new)) < new:
        raise ConfigError(f"trainer.epochs={new} cannot extend the run in {run_dir}: its cosine learning rate "
                          f"reaches its minimum at epoch {pins.get('scheduler.T_max', scheduler.get('T_max'))} and "
                          f"would climb back up after it; start a new run with trainer.epochs={new} (init_from="
                          f"{run_dir}/checkpoints/last.pt starts from its weights); nothing was changed")
    if ".gblr." in str(regularizer.get("_target_", "")):
        raise ConfigError(f"trainer.epochs={new} cannot extend the GBLR run in {run_dir}: its sigma schedule "
                          f"spans the run's {old} epochs; start a new run instead; nothing was changed")
    with read_write(config), open_dict(config):
        for key, value in pins.items():
            OmegaConf.update(config, key, value, merge=False)
    STATE.pins[run_dir] = [f"{k}={json.dumps(v)}" for k, v in pins.items()]
    kept = f"; kept as the run had them: {', '.join(STATE.pins[run_dir])}" if pins else ""
    STATE.notes[run_dir] = f"extending {run_dir} from {old} to {new} epochs{kept}"
    return validate(config, hydra)


def decide(run_dir: Path, c: dict) -> str:
    """'new', 'resume' or 'overwrite' for a run with resolved config `c` in `run_dir`; ConfigError otherwise."""
    if is_empty(run_dir):
        return "new"
    if failed_record(run_dir):  # a member that failed before training: the retry replaces its record
        return "overwrite"
    stored = stored_config(run_dir)
    if stored is None:
        raise ConfigError(f"run directory {run_dir} is not empty and holds no run (no config.yaml): "
                          "choose a new or empty directory; nothing was changed")
    diffs = [k for k in differences(stored, c)
             if not (c.get("resume") and k == "trainer.epochs" and select(c, k) > select(stored, k, 0))]
    if c.get("resume") and not diffs:
        return "resume"
    if c.get("overwrite"):
        if not (run_dir / MARKER).exists():
            raise ConfigError(f"overwrite=true, but {run_dir} has no run marker ({MARKER}): no run of this project "
                              "(of this version) wrote it, so nothing there is removed; choose another directory; "
                              "nothing was changed")
        return "overwrite"
    if c.get("resume"):
        raise refuse_resume(run_dir, stored, c, diffs)
    raise ConfigError(f"run directory {run_dir} already holds a run: resume=true continues it, overwrite=true "
                      "replaces it (its run files only), or choose another directory; nothing was changed")


def clear_previous(run_dir: Path) -> None:
    """overwrite=true: remove the files a run writes (by name), nothing else."""
    for pattern in RUN_FILES:
        for p in run_dir.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)  # a wandb run's own folder
            else:
                p.unlink()
    for folder in (".hydra", "checkpoints", "wandb"):
        try:
            (run_dir / folder).rmdir()  # only if nothing else is left in it
        except OSError:
            pass


# -- the claim -------------------------------------------------------------------------------------------
def alive(owner: dict) -> bool:
    """Whether the process named in a marker still runs (a process on another host: assumed so)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(owner.get("pid", 0)) > 0


def read_owner(marker: Path) -> dict:
    try:
        owner = json.loads(marker.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def who(owner: dict) -> str:
    return (f"process {owner['pid']} on {owner.get('host')}, started {owner.get('started')}" if "pid" in owner
            else "a run that is starting")


@dataclass
class Claim:
    """The run marker, open and locked by this process."""
    marker: Path
    fd: int
    created: bool  # this process created the marker

    def write(self, **owner) -> None:
        data = json.dumps({"project": "wgsef", **owner}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self, ended: bool = True, remove: bool = False) -> None:
        """Unlock; `ended`: record that the run left (not for a refused run: it changes nothing)."""
        try:
            if remove:
                self.marker.unlink(missing_ok=True)
            elif ended:
                self.write(**{**read_owner(self.marker), "state": "ended"})
        except OSError:  # e.g. a full disk: the lock goes with the file descriptor anyway
            pass
        os.close(self.fd)


def acquire(run_dir: Path) -> Claim:
    """Open (creating it exclusively if absent) and lock the run marker; ConfigError if another live run holds
    it. Without flock (some network file systems), the pid in the marker decides."""
    marker = run_dir / MARKER
    try:
        fd, created = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        fd, created = os.open(marker, os.O_RDWR), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = read_owner(marker)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or not created and owner.get("state") == "running" \
                and alive(owner):
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use by another run ({who(owner)}): wait for it to "
                              "end, or choose another directory; nothing was changed") from None
    return Claim(marker, fd, created)


def make_dirs(run_dir: Path) -> list[Path]:
    """Create run_dir and its missing parents; returns those that were missing, deepest first."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
    return missing


def remove_empty(created: list[Path]) -> None:
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break


def enter(run_dir: Path, c: dict) -> str:
    """Claim run_dir for this process and decide what the run does there ('new', 'resume', 'overwrite'). The
    decision is taken once before anything is touched (most refusals) and again under the claim (a run that
    entered meanwhile); a refused run removes the marker and folders it created and changes nothing else."""
    decide(run_dir, c)
    created = make_dirs(run_dir)
    try:
        claim = acquire(run_dir)
    except ConfigError:
        remove_empty(created)
        raise
    try:
        decision = decide(run_dir, c)
    except ConfigError:
        claim.release(ended=False, remove=claim.created)
        remove_empty(created)
        raise
    previous = read_owner(claim.marker)
    if previous.get("state") == "running":
        print(f"note: {run_dir} was claimed by {who(previous)}, which ended without releasing it (killed?); "
              "this run takes it over", file=sys.stderr)
    claim.write(pid=os.getpid(), host=socket.gethostname(), started=datetime.now().isoformat(timespec="seconds"),
                state="running")
    STATE.claims[run_dir], STATE.created[run_dir], STATE.decisions[run_dir] = claim, created, decision
    return decision


def claim_for_record(run_dir: Path) -> bool:
    """Whether this process may write a failure record into run_dir: it holds the claim, or the directory is
    empty (or a failure record) and it can claim it now."""
    if run_dir not in STATE.claims and (is_empty(run_dir) or failed_record(run_dir)):
        try:
            STATE.claims[run_dir] = acquire(run_dir)
        except ConfigError:
            return False
    return run_dir in STATE.claims


def leave(run_dir: Path, discard: bool = False) -> None:
    """Release the claim of run_dir; `discard` (the run failed before writing anything): remove what this
    process created, the run directory and the folders above it included."""
    claim = STATE.claims.pop(run_dir, None)
    created = STATE.created.pop(run_dir, [])
    STATE.pins.pop(run_dir, None)
    if claim is not None:
        claim.release(remove=discard and claim.created)
    if discard and created and not (created[0] / "checkpoints" / "last.pt").exists():
        shutil.rmtree(created[0], ignore_errors=True)
        remove_empty(created[1:])


# -- where a stopped run stands ----------------------------------------------------------------------------
def last_epoch(run_dir: Path) -> int | None:
    """The epochs held by the run's checkpoint (None without one)."""
    import torch

    try:
        return int(torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False,
                              mmap=True)["state"]["epoch"])
    except Exception:
        return None


def stopped(run_dir: Path, epochs: int) -> str:
    """Where a run that stopped early stands, and the command that resumes it."""
    done = last_epoch(run_dir)
    if done is None and is_empty(run_dir):
        return f"it stopped before training began and left nothing to resume in {run_dir}: run the command again"
    where = (f"in epoch {done + 1} of {epochs}; checkpoints/last.pt holds epochs 1-{done}" if done
             else f"in epoch 1 of {epochs}, before its first checkpoint")
    return f"the run stopped {where}; resume it with: {RESUME.format(run_dir)}"


def disk_full(run_dir: Path, epochs: int) -> str:
    """The line for a run that met a full disk; removes the run's temporary files."""
    for name in TEMPORARY:
        (run_dir / name).unlink(missing_ok=True)
    return (f"disk full: no space left on the device of {run_dir} (the temporary files were removed, the last good "
            f"checkpoint kept); {stopped(run_dir, epochs).replace('resume it with:', 'free space, then resume it:')}")


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
    claims: dict[Path, Claim] = field(default_factory=dict)
    pins: dict[Path, list[str]] = field(default_factory=dict)  # overrides an extension added
    resume: dict[Path, tuple[list[str], list[str]]] = field(default_factory=dict)  # (the run's own, given now)
    notes: dict[Path, str] = field(default_factory=dict)  # a line for stdout once the run is accepted
    records: Path | None = None  # a multirun's member records


STATE = State()


def check_and_enter(config, c: dict, run_dir: Path, key: str, hydra=None) -> dict:
    """The run-directory checks of one run (single runs from Guard, sweep members from the entry point)."""
    check_location(run_dir, key)
    c = extend(config, run_dir, c, hydra)
    enter(run_dir, c)
    if run_dir in STATE.notes:
        print(STATE.notes.pop(run_dir), flush=True)
    warning = finish_at_start(c)  # once the run is accepted: a refused run prints its one line only
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return c


class Guard(Callback):
    """Hydra callback (configs/hydra/default.yaml): checks the config and the run directory before Hydra
    creates it; gives a multirun's members a folder for their records (the sweep's final report)."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            c = validate(config)
            if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 checks and claims the directory for all
                return
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            key = location_key(config.hydra, c)
            asked = any(o.lstrip("+").partition("=")[0] == "resume" for o in config.hydra.overrides.task)
            if c.get("resume") and asked and is_empty(run_dir):  # (an experiment's resume: true starts anew)
                raise ConfigError(f"resume=true, but {run_dir} holds no run to resume: give the run's directory, "
                                  f"{RESUME.format('<run dir>')}" + ("" if key == "hydra.run.dir" else
                                                                     " (without it a run gets a new directory)"))
            check_and_enter(config, c, run_dir, key)
        except ConfigError as e:
            raise Refused(e) from None

    def on_multirun_start(self, config, **kwargs) -> None:
        """The records go to one folder in the sweep directory of this composition, whatever directory each
        member's own config gives it; its path reaches every member, whatever the launcher, through
        hydra.job.env_set (the members are composed from these hydra overrides)."""
        from omegaconf import open_dict, read_write

        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        given = any(o.lstrip("+").startswith("hydra.sweep.dir=") for o in config.hydra.overrides.hydra)
        try:
            check_location(sweep_dir, "hydra.sweep.dir" if given else "paths.runs_dir")
        except ConfigError as e:
            raise Refused(e) from None
        STATE.records = sweep_dir / f".members-{run_id()}"
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.WGSEF_SWEEP_RECORDS='{STATE.records}'")
