"""An adversarial user: every bad value is refused before any work with one line naming the key (exit 2), and
no file the run did not create is ever deleted or changed (a sentinel file/folder proves it). In-process:
the same code path as the command line (experiments.train.cli), without a Python start-up per case."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

FAST = ["trainer.epochs=3", "measure.enabled=false"]


def cli(monkeypatch, capsys, *args):
    """(exit code, stderr lines, stdout lines) of `python -m experiments.train args`."""
    from experiments.train import cli as main

    monkeypatch.setattr(sys, "argv", ["train", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out.strip().splitlines()


def snapshot(folder: Path) -> dict:
    """Every file under folder with its content hash (directories too): any change shows."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A working folder holding a user's notes, as the current directory; runs go to runs/ inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "ideas.txt").write_text("do not delete")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("| keep |")
    return tmp_path


BAD = [  # (overrides, the start of the one line that must name the key)
    (["model.width=abc"], "model.width must be a number >= 1/6"),
    (["model.width=0"], "model.width must be a number >= 1/6"),
    (["model.width=-1"], "model.width must be a number >= 1/6"),
    (["model=vgg16", "model.width=0.001"], "model.width must be a number >= 1/64 = 0.015625"),
    (["model=mobilenetv1", "model.width=0.01"], "model.width must be a number >= 1/32"),
    (["dataset.image_size=0"], "dataset.image_size must be an integer >= 1, got 0"),
    (["dataset.image_size=abc"], "dataset.image_size must be an integer >= 1, got 'abc'"),
    (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
    (["seed=1.5"], "seed must be an integer >= 0, got 1.5"),
    (["seed=-1"], "seed must be an integer >= 0"),
    (["method=wgsef", "regularizer.lam=1e-3x"], "regularizer.lam must be a number, got '1e-3x'"),
    (["method=wgsef", "regularizer.lam=nan"], "regularizer.lam must be a finite number, got nan"),
    (["method=wgsef", "regularizer.lam=inf"], "regularizer.lam must be a finite number, got inf"),
    (["method=group_lasso", "regularizer.lam=-inf"], "regularizer.lam must be a finite number"),
    (["method=wgsef", "regularizer.k=abc"], "regularizer.k must be"),
    (["measure.batches=[0]"], "measure.batches must be a non-empty list of integers >= 1"),
    (["measure.batches=[]"], "measure.batches must be a non-empty list"),
    (["measure.round_to=0"], "measure.round_to must be an integer >= 1"),
    (["measure.repeats=0"], "measure.repeats must be an integer >= 1"),
    (["measure.threads=0"], "measure.threads must be an integer >= 1"),
    (["measure.threads=2"], "measure.threads=2 needs measure.clock=wall"),
    (["measure.clock=sundial"], "measure.clock must be one of cpu, wall"),
    (["measure.min_run_time=0"], "measure.min_run_time must be a number > 0"),
    (["scheduler=step", "scheduler.milestones=abc"], "scheduler.milestones must be a non-empty list of epochs"),
    (["scheduler=step", "scheduler.gamma=-1"], "scheduler.gamma must be a number > 0"),
    (["resume=maybe"], "resume must be one of true, false, got 'maybe'"),
    (["overwrite=1"], "overwrite must be one of true, false, got 1"),
    (["method=wgsef", "regularizer.finish_epoch=3"], "regularizer.finish_epoch=3 is beyond the run (trainer.epochs=3)"),
    (["method=ssl", "regularizer.finetune_epoch=9"], "regularizer.finetune_epoch=9 is beyond the run"),
    (["method=hspg", "optimizer.n_p=5"], "optimizer.n_p=5 is beyond the run"),
    (["logger=wandb", "logger.mode=sideways"], "logger.mode must be one of online, offline, disabled, got 'sideways'"),
    (["+trainer.epoch=5"], "unknown key trainer.epoch (did you mean trainer.epochs?); trainer has: epochs"),
    (["+measure.repeat=5"], "unknown key measure.repeat (did you mean measure.repeats?)"),
    (["+seeds=3"], "unknown key seeds (did you mean seed?)"),
    (["method=wgsef", "+regularizer.lamda=0.1"], "unknown key regularizer.lamda (did you mean regularizer.lam?)"),
    (["+optimizer.momentun=0.5"], "unknown key optimizer.momentun (did you mean optimizer.momentum?)"),
    (["optimizer.lr=fast"], "optimizer.lr must be a number > 0, got 'fast'"),
    (["optimizer.lr=-1"], "optimizer.lr must be a number > 0, got -1"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum must be a number >= 0, got -0.5"),
    (["method=wgsef", "optimizer.weight_decay=-1"], "optimizer.weight_decay must be a number >= 0, got -1"),
    (["trainer.compile=ture"], "trainer.compile must be true, false or a torch.compile backend ("),
    (["scheduler=step", "scheduler.milestones=[5,10]", "trainer.epochs=2"],
     "scheduler.milestones=[5, 10] reaches beyond the run (trainer.epochs=2)"),
    (["scheduler=step", "scheduler.milestones=[1,3]"], "scheduler.milestones=[1, 3] reaches beyond the run"),
    (["model=vgg16", "model.width=0.125", "dataset.image_size=2"],
     "dataset.image_size=2 is too small for model vgg16: it needs images of at least 16x16 pixels"),
    (["model=resnet18", "model.width=0.125", "dataset.image_size=4"], "too small for model resnet18"),
    (["trainer.epoch=2"], "unknown key trainer.epoch (did you mean trainer.epochs?); trainer has: epochs"),
    (["measure.repeat=2"], "unknown key measure.repeat (did you mean measure.repeats?)"),
    (["regularizer.k=0.5"], "regularizer.k is not a key of the chosen regularizer: it belongs to regularizer=wgsef "
                            "(method=gmp, magnitude, wgsef, wgsef_cont, wgsef_hspg); choose one of those, e.g. "
                            "method=gmp regularizer.k=..."),
    (["method=dense", "regularizer.lam=0.1"], "regularizer.lam is not a key of the chosen regularizer: it belongs to "
                                              "regularizer=gblr, group_lasso, wgsef (method="),
    (["method=wgsef", "regularizer.lamda=0.1"], "unknown key regularizer.lamda (did you mean regularizer.lam?)"),
    (["optimizer.nesterov=maybe"], "optimizer.nesterov must be true or false"),
    (["trainer.progress=sometimes"], "trainer.progress must be one of true, false, auto"),
    (["trainer.epochs=1.5"], "trainer.epochs must be an integer >= 1, got 1.5"),
    (["trainer.batch_size=abc"], "trainer.batch_size must be an integer >= 1"),
    (["dataset=cifar10", "dataset.val_fraction=1.5"], "dataset.val_fraction must be a number in (0, 1)"),
    (["dataset=cifar10", "dataset.download=perhaps"], "dataset.download must be one of true, false"),
    (["dataset=cifar10", "dataset.root=notes/ideas.txt"], "dataset.root=notes/ideas.txt is a file"),
    (["method=ssl_from_dense"], "method=ssl_from_dense starts from the dense run"),
    (["init_from=notes/missing.pt"], "init_from=notes/missing.pt does not exist"),
    (["name="], "name must be a non-empty string"),
]


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_refused_and_nothing_touched(home, monkeypatch, capsys, i):
    """A new run directory is not left behind; `hydra.run.dir=.` (the user's folder: every other case) is not
    touched."""
    args, message = BAD[i]
    before = snapshot(home)
    run_dir = "." if i % 2 else "runs/new/run"
    code, err, out = cli(monkeypatch, capsys, *FAST, *args, f"hydra.run.dir={run_dir}")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert out == [] and snapshot(home) == before


@pytest.mark.parametrize("run_dir", [".", "results", "notes", "empty"])
def test_error_after_the_checks_deletes_nothing_it_did_not_create(home, monkeypatch, capsys, run_dir):
    """The issue's case: a config error (k=1.5, seen by the constructor) in `hydra.run.dir=results` (or `.`)
    deleted that folder. A non-empty folder is refused up front; an empty one is used, and kept."""
    (home / "empty").mkdir()
    before = snapshot(home)
    code, err, _ = cli(monkeypatch, capsys, *FAST, "method=wgsef", "regularizer.k=1.5", f"hydra.run.dir={run_dir}")
    assert code == 2 and len(err) == 1, err
    assert ("k must be a group count" if run_dir == "empty" else "holds no run") in err[0], err
    assert snapshot(home) == before


def test_error_removes_only_the_folders_it_created(home, monkeypatch, capsys):
    (home / "runs").mkdir()
    (home / "runs" / "old.txt").write_text("keep")
    code, err, _ = cli(monkeypatch, capsys, *FAST, "model=vgg16", "model.width=0.125", "method=wgsef",
                       "regularizer.k=100000", "hydra.run.dir=runs/a/b/c")
    assert code == 2 and "larger than the number of filter groups" in err[0], err
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["old.txt"]


def test_run_dir_under_a_file(home, monkeypatch, capsys):
    code, err, _ = cli(monkeypatch, capsys, *FAST, "hydra.run.dir=notes/ideas.txt/run")
    assert code == 2 and len(err) == 1 and "hydra.run.dir: " in err[0] and "ideas.txt is a file" in err[0], err
    assert (home / "notes" / "ideas.txt").read_text() == "do not delete"


def test_read_only_runs_dir(home, monkeypatch, capsys):
    ro = home / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: stand in for a user without the permission
        import wgsef.rundir
        monkeypatch.setattr(wgsef.rundir.os, "access", lambda p, mode: Path(p) != ro)
    code, err, _ = cli(monkeypatch, capsys, *FAST, f"paths.runs_dir={ro}/runs")
    ro.chmod(0o755)
    assert code == 2 and len(err) == 1 and f"paths.runs_dir={ro}/runs: {ro} is not writable" in err[0], err
    assert list(ro.iterdir()) == []


def test_width_works_for_every_model(make_cfg):
    from wgsef.schema import validate

    for model, width in (("lenet5", 0.5), ("vgg16", 0.125), ("resnet18", 0.125), ("mobilenetv1", 0.25)):
        assert validate(make_cfg(f"model={model}", f"model.width={width}"))["model"]["width"] == width


def test_every_option_of_every_group_passes_the_schema(make_cfg):
    """The schema accepts what the project ships (others' new keys included: signatures, not a list)."""
    from tests.test_configs import OPTIONS, NEEDS_PENALTY
    from wgsef.schema import validate

    for group, options in OPTIONS.items():
        for option in options:
            extra = [NEEDS_PENALTY[option]] if option in NEEDS_PENALTY else []
            validate(make_cfg(f"{group}={option}", *extra))
    for method in sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml")):
        if method != "ssl_from_dense":  # needs its dense run on disk
            validate(make_cfg(f"method={method}"))


# -- run directories: unique, reused only to resume the same run, overwrite keeps what is not the run's ---------
def tiny(home, *extra):
    return ["trainer.epochs=1", "measure.enabled=false", "dataset.image_size=12", f"paths.runs_dir={home}/runs",
            *extra]


def test_runs_in_the_same_second_get_their_own_directories(home, monkeypatch, capsys):
    dirs = []
    for seed in (1, 2):
        code, err, out = cli(monkeypatch, capsys, *tiny(home, f"seed={seed}"))
        assert code == 0, err
        assert out[-1].startswith("completed: final test acc "), out  # the run's last stdout line
        dirs.append(Path(out[-1].rsplit(", run ", 1)[1]))
    assert dirs[0] != dirs[1] and dirs[0].parent == dirs[1].parent and sorted(dirs) == dirs
    assert [json.loads((d / "summary.json").read_text())["seed"] for d in dirs] == [1, 2]


def test_parallel_launches_get_their_own_run_ids():
    code = "from wgsef.rundir import run_id; print(run_id())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(ids)) == 2, ids


RACE = """
import json, sys, time
from pathlib import Path
from wgsef.rundir import STATE, enter, leave
from wgsef.schema import ConfigError
base, n = Path(sys.argv[1]), int(sys.argv[2])
(base / f"ready-{sys.argv[3]}").touch()
while not (base / "go").exists():  # the barrier: both processes start claiming at the same moment
    time.sleep(0.001)
outcome = {}
for i in range(n):
    run_dir = base / f"run{i}"
    try:
        enter(run_dir, {"resume": False, "overwrite": False, "seed": int(sys.argv[3])})
    except ConfigError as e:
        outcome[i] = str(e)
        continue
    (run_dir / "config.yaml").write_text(f"seed: {sys.argv[3]}")  # what the run writes first
    outcome[i] = "won"
    if i % 2:  # half the winners leave at once: the other process may then enter after them
        leave(run_dir)
print(json.dumps(outcome))
"""


def test_two_processes_racing_for_one_folder(tmp_path):
    """Two processes claim the same 40 new folders at the same moment (a barrier file): for every folder exactly
    one wins and the other is refused with one line, in use or already holding the winner's run."""
    n = 40
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(n), str(seed)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    while len(list(tmp_path.glob("ready-*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outcomes.append({int(k): v for k, v in json.loads(out).items()})
    for i in range(n):
        results = [o[i] for o in outcomes]
        assert results.count("won") == 1, results
        refusal = next(r for r in results if r != "won")
        assert "\n" not in refusal and ("is in use by another run (" in refusal or "already holds a run" in
                                         refusal), refusal
        winner = 1 + results.index("won")
        assert (tmp_path / f"run{i}" / "config.yaml").read_text() == f"seed: {winner}"


DRIVER = """
import sys, time
from pathlib import Path
import wgsef.rundir as R
enter = R.enter
def at_the_barrier(*args, **kwargs):
    go = Path(sys.argv[-1].partition("=")[2]).parent / "go"
    (go.parent / f"ready-{R.os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.001)
    return enter(*args, **kwargs)
R.enter = at_the_barrier
sys.argv = ["train", *sys.argv[1:]]
import runpy
runpy.run_module("experiments.train", run_name="__main__")
"""


@pytest.mark.slow  # two fresh training processes
def test_two_runs_started_together_into_one_folder(tmp_path):
    """The issue's case: two runs with different configs into one hydra.run.dir, released at the same moment
    (both at the claim). Exactly one runs; the other is refused with one line and changes nothing; the folder
    holds the winner's files only."""
    run_dir = tmp_path / "race" / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, *tiny(tmp_path, f"seed={seed}"),
                               "trainer.progress=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    while len(list(tmp_path.glob("race/ready-*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    (tmp_path / "race" / "go").touch()
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = [code for code, _, _ in results].index(0) + 1
    _, out, err = results[2 - winner]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ("in use by another run (" in lines[0] or "already holds a run" in lines[0]), lines
    assert out == ""
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == winner
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == winner
    assert f"seed={winner}" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_a_run_in_progress_refuses_a_second_one(home, monkeypatch, capsys):
    """While a process holds a run directory (its claim), another run into it is refused, naming that process,
    and changes nothing."""
    from wgsef.rundir import acquire

    run_dir = home / "runs" / "busy"
    run_dir.mkdir(parents=True)
    claim = acquire(run_dir)
    claim.write(pid=os.getpid(), host="here", started="now", state="running")
    before = snapshot(home)
    try:
        code, err, out = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=runs/busy"))
        after = snapshot(home)
    finally:
        claim.release()
    assert code == 2 and len(err) == 1 and f"in use by another run (process {os.getpid()} on here" in err[0], err
    assert after == before


def test_a_stale_claim_is_explained_and_taken_over(finished, monkeypatch, capsys):
    """A run killed without releasing its directory (state running, its pid gone): resume says so in one
    line and continues."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = finished / ".wgsef-run"
    marker.write_text(json.dumps({"project": "wgsef", "pid": dead.pid, "host": socket.gethostname(),
                                  "started": "then", "state": "running"}))
    code, err, out = cli(monkeypatch, capsys, "resume=true", "hydra.run.dir=runs/mine")
    assert code == 0, err
    notes = [line for line in err if line.startswith("note: ")]
    assert len(notes) == 1 and f"process {dead.pid} on {socket.gethostname()}" in notes[0] and \
        "ended without releasing it" in notes[0], err
    assert json.loads(marker.read_text())["state"] == "ended"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A completed one-epoch run (trained once for the module)."""
    from experiments.train import cli as main

    home = tmp_path_factory.mktemp("one_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setattr(sys, "argv", ["train", *tiny(home, "hydra.run.dir=runs/mine")])
        main()
    return home / "runs" / "mine"


@pytest.fixture
def finished(home, one_run):
    """That run copied to runs/mine of the user's folder, with a user's file beside its files."""
    shutil.copytree(one_run, home / "runs" / "mine")
    (home / "runs" / "mine" / "my_notes.txt").write_text("mine")
    return home / "runs" / "mine"


@pytest.mark.parametrize("args,message", [
    ([], "already holds a run: resume=true continues it, overwrite=true replaces it"),
    (["seed=1"], "already holds a run"),
    (["resume=true", "seed=1"], "resume=true, but seed=1 (the run has seed=0) would change the run in "),
    (["resume=true", "trainer.epochs=2"], "trainer.epochs=2 cannot extend the run in "),  # its cosine lr
    (["resume=true", "trainer.epochs=2", "scheduler=none"], "scheduler=none (the run has scheduler=cosine)"),
    (["resume=true", "method=wgsef", "seed=0"], "method=wgsef (the run has method=null) would change the run"),
], ids=["again", "other seed", "resume other seed", "resume longer cosine", "resume other scheduler",
        "resume other method"])
def test_refused_reuse_changes_nothing(finished, monkeypatch, capsys, args, message):
    """Only the run's own overrides are reloaded (.hydra/overrides.yaml): a refused resume names the overrides
    given now that change the run, never suggests overwrite, and changes nothing."""
    before = snapshot(finished)
    code, err, out = cli(monkeypatch, capsys, "hydra.run.dir=runs/mine", *args)
    assert code == 2 and len(err) == 1 and message in err[0] and "nothing was changed" in err[0], err
    assert out == [] and snapshot(finished) == before  # config.yaml, .hydra/, checkpoint, summary, marker, notes
    if "resume=true" in args:
        assert "overwrite" not in err[0], err


def test_resume_alone_reloads_the_run_and_says_where_it_starts(finished, monkeypatch, capsys):
    """`resume=true hydra.run.dir=<run>` alone: the run's own overrides come back, a volatile key may change."""
    code, err, out = cli(monkeypatch, capsys, "resume=true", "hydra.run.dir=runs/mine", "trainer.progress=false")
    assert code == 0, err
    assert out[0] == f"resumed {finished} after its last epoch (1): nothing left to train", out
    assert json.loads((finished / "summary.json").read_text())["resumed"] is True
    assert "measure.enabled=false" in (finished / ".hydra" / "overrides.yaml").read_text()


def test_resume_without_a_run_directory_is_refused(home, monkeypatch, capsys):
    """Without hydra.run.dir a run gets a new directory: there is nothing to resume there."""
    before = snapshot(home)
    code, err, out = cli(monkeypatch, capsys, *tiny(home, "resume=true"))
    assert code == 2 and len(err) == 1 and "holds no run to resume: give the run's directory, python -m " \
        "experiments.train resume=true hydra.run.dir=<run dir> (without it a run gets a new directory)" in err[0], err
    assert snapshot(home) == before


def test_extending_a_run_keeps_its_schedule(home, monkeypatch, capsys):
    """resume=true trainer.epochs=3 of a 2-epoch WGSEF run on a step schedule: the epochs that follow the run's
    length (finish at 3/4, milestones at 1/2 and 3/4) keep the run's values, recorded as overrides so that the
    next resume finds the same run; the first two epochs are not retrained."""
    code, err, _ = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=runs/ext", "method=wgsef", "scheduler=step",
                                                  "trainer.epochs=2", "trainer.progress=false"))
    run_dir = home / "runs" / "ext"
    assert code == 0, err
    first = (run_dir / "metrics.csv").read_text().splitlines()
    code, err, out = cli(monkeypatch, capsys, "resume=true", "hydra.run.dir=runs/ext", "trainer.epochs=3")
    assert code == 0, err
    assert out[0] == (f"extending {run_dir} from 2 to 3 epochs; kept as the run had them: "
                      "regularizer.finish_epoch=1, scheduler.milestones=[1, 1]"), out
    assert out[1] == f"resumed {run_dir} at epoch 3 of 3 (epochs 1-2 from its checkpoint)", out
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["epochs"] == 3 and config["regularizer"]["finish_epoch"] == 1
    assert config["scheduler"]["milestones"] == [1, 1]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and [r.split(",")[:6] for r in rows[:3]] == [r.split(",")[:6] for r in first]
    code, err, out = cli(monkeypatch, capsys, "resume=true", f"hydra.run.dir={run_dir}")  # the extended run
    assert code == 0 and out[0] == f"resumed {run_dir} after its last epoch (3): nothing left to train", (err, out)


def test_overwrite_replaces_the_run_files_only(finished, monkeypatch, capsys):
    """The run's files by name: a user's checkpoint beside the run's own in checkpoints/ stays."""
    (finished / "checkpoints" / "my_best_epoch1.pt").write_bytes(b"mine")
    code, err, _ = cli(monkeypatch, capsys, *tiny(finished.parents[1], "hydra.run.dir=runs/mine", "overwrite=true",
                                                  "seed=7"))
    assert code == 0, err
    assert json.loads((finished / "summary.json").read_text())["seed"] == 7
    assert (finished / "my_notes.txt").read_text() == "mine"
    assert (finished / "checkpoints" / "my_best_epoch1.pt").read_bytes() == b"mine"
    assert "seed=7" in (finished / ".hydra" / "overrides.yaml").read_text()


def test_overwrite_needs_the_run_marker(home, monkeypatch, capsys):
    """A folder with a config.yaml (the user's own, or a run from before the marker) is not a run of this
    project: overwrite removes nothing there."""
    mine = home / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "config.yaml").write_text("lr: 0.1\n")
    (mine / "metrics.csv").write_text("epoch,acc\n1,0.5\n")
    (mine / "checkpoints" / "best_model.pt").write_bytes(b"weights")
    before = snapshot(home)
    code, err, _ = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=mine", "overwrite=true"))
    assert code == 2 and len(err) == 1 and "has no run marker (.wgsef-run)" in err[0], err
    assert snapshot(home) == before


def test_overwrite_refuses_a_folder_that_holds_no_run(home, monkeypatch, capsys):
    before = snapshot(home)
    code, err, _ = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=notes", "overwrite=true"))
    assert code == 2 and "holds no run" in err[0], err
    assert snapshot(home) == before


def test_a_finish_at_initialisation_is_warned(home, monkeypatch, capsys):
    """WGSEF with trainer.epochs=1: its top-k finish lands at epoch 0 (3/4 of one epoch): one warning line."""
    code, err, _ = cli(monkeypatch, capsys, *tiny(home, "method=wgsef", "trainer.progress=false"))
    assert code == 0, err
    assert err == ["warning: regularizer.finish_epoch=0 (trainer.epochs=1): WGSEF's top_k finish comes at "
                   "initialisation, before any training, so the run fine-tunes a random top-k; use trainer.epochs >= 2 "
                   "or a later regularizer.finish_epoch"], err


def test_divergence_is_a_status_not_an_input_error(home, monkeypatch, capsys):
    """WGSEF at lr 1e6: the prox meets infinite group norms in the first epoch. Status diverged with epoch and
    step, the directory kept, and no claim of a checkpoint that does not exist."""
    code, err, out = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=runs/div", "method=wgsef",
                                                  "optimizer.lr=1e6", "trainer.epochs=2"))
    run_dir = home / "runs" / "div"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 1 and summary["status"] == "diverged" and "at epoch 1, step" in summary["error"]
    assert not (run_dir / "checkpoints").exists() and "no checkpoint was written" in err[-1], err
    assert out[-1].startswith("diverged: ") and out[0].startswith("run ") and len(out) == 2  # no epoch completed


def test_make_clean_keeps_runs_unless_confirmed(tmp_path):
    for p in ("runs/a/summary.json", ".pytest_cache/x", "wgsef/__pycache__/m.pyc"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("x")
    make = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "clean"]
    r = subprocess.run(make, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs/a/summary.json").exists() and "CONFIRM=1" in r.stdout
    assert not (tmp_path / ".pytest_cache").exists() and not (tmp_path / "wgsef/__pycache__").exists()
    r = subprocess.run([*make, "CONFIRM=1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (tmp_path / "runs").exists(), r.stderr


def test_sweep_member_refused_reuse_changes_nothing_and_fails_the_sweep(home, monkeypatch, capsys):
    sweep = ["-m", *tiny(home, "hydra.sweep.dir=sweep")]
    code, err, out = cli(monkeypatch, capsys, *sweep, "seed=0")
    assert code == 0 and out[-1].startswith("completed: "), err  # after Hydra's "Launching ..." lines
    before = snapshot(home / "sweep" / "0")  # (Hydra rewrites the sweep's own multirun.yaml each time)
    code, err, _ = cli(monkeypatch, capsys, *sweep, "seed=1")  # member 0 again, another config
    report = [line for line in err if line.startswith("sweep member ")]
    assert code == 1 and len(report) == 1 and "seed=1 failed: " in report[0] and "already holds a run" in report[0], err
    assert snapshot(home / "sweep" / "0") == before


def test_a_sweep_whose_members_all_fail_exits_non_zero(home, monkeypatch, capsys):
    """The issue's case: members named after their model (runs/multirun/digits-vgg16/..., .../digits-mobilenetv1/
    ...), none in the sweep folder of the default name: each failed member is reported with its overrides, the
    sweep exits 1, and no records are left behind."""
    code, err, _ = cli(monkeypatch, capsys, "-m", *tiny(home, "model=vgg16,mobilenetv1", "model.width=0.01"))
    report = [line for line in err if line.startswith("sweep member ")]
    assert code == 1 and err[-1] == "error: 2 of 2 sweep members failed", err
    assert len(report) == 2 and "model=vgg16 model.width=0.01 failed: model.width must be a number >= 1/64" in \
        report[0] and "model=mobilenetv1 model.width=0.01 failed: model.width must be a number >= 1/32" in report[1]
    for model, line in zip(("vgg16", "mobilenetv1"), report):
        run_dir = Path(line.rsplit("(", 1)[1].rstrip(")"))
        assert run_dir.parent.parent.name == f"digits-{model}"
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
        sweep_id = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["env_set"]
        assert Path(sweep_id["WGSEF_SWEEP_RECORDS"]).name.startswith(".members-")  # the sweep, with each member
    assert not list(home.rglob(".members-*"))


def test_a_sweep_reports_members_wherever_their_name_put_them(home, monkeypatch, capsys):
    """One member completes under digits-vgg16, one fails under digits-lenet5: "1 of 2", exit 1."""
    code, err, out = cli(monkeypatch, capsys, "-m", *tiny(home, "model=vgg16,lenet5", "model.width=0.125",
                                                          "dataset.image_size=16", "+dataset.limit=128",
                                                          "trainer.progress=false"))
    assert code == 1 and err[-1] == "error: 1 of 2 sweep members failed", err
    report = [line for line in err if line.startswith("sweep member ")]
    assert len(report) == 1 and "model=lenet5" in report[0] and "failed: model.width must be a number >= 1/6" in \
        report[0] and "/digits-lenet5/" in report[0], report
    assert any(line.startswith("completed: ") and "digits-vgg16" in line for line in out), out
    assert not list(home.rglob(".members-*"))


def test_ctrl_c_in_a_sweep_stops_it_with_one_line_and_no_records(home, monkeypatch, capsys):
    """Ctrl-C in the second member: its line says where it stopped and how to resume it alone (its own
    overrides are reloaded); the member that completed is reported as such (no failure), exit 130, and the
    sweep's records are gone."""
    from wgsef.train import Trainer

    calls = {"n": 0}
    start_epoch = Trainer.start_epoch

    def interrupted(self, epoch):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2 of member 1 begins (members 0 and 1, two epochs each)
            raise KeyboardInterrupt
        return start_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "start_epoch", interrupted)
    code, err, out = cli(monkeypatch, capsys, "-m", *tiny(home, "seed=1,2", "trainer.epochs=2", "+dataset.limit=128",
                                                          "trainer.progress=false", "hydra.sweep.dir=sweep"))
    member = home / "sweep" / "1"
    assert code == 130 and err == [f"interrupted (Ctrl-C): the run stopped in epoch 2 of 2; checkpoints/last.pt holds "
                                   f"epochs 1-1; resume it with: python -m experiments.train resume=true "
                                   f"hydra.run.dir={member}"], err
    assert sum(line.startswith("completed: ") for line in out) == 1 and not list(home.rglob(".members-*"))
    monkeypatch.setattr(Trainer, "start_epoch", start_epoch)
    code, err, out = cli(monkeypatch, capsys, "resume=true", f"hydra.run.dir={member}")
    assert code == 0 and out[0] == f"resumed {member} at epoch 2 of 2 (epochs 1-1 from its checkpoint)", (err, out)
    assert json.loads((member / "summary.json").read_text())["seed"] == 2
