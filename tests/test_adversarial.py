"""An adversarial user: every bad value is refused before any work with one line naming the key (exit 2), and
no file the run did not create is ever deleted or changed (a sentinel file/folder proves it). In-process:
the same code path as the command line (experiments.train.cli), without a Python start-up per case."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    (["optimizer.lr=fast"], "optimizer.lr must be a number, got 'fast'"),
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


def test_parallel_launches_never_share_a_directory(tmp_path):
    """Two processes started together get different run ids, and a new directory is claimed exclusively: the
    second process to create it is refused instead of sharing it."""
    from wgsef.rundir import claim
    from wgsef.schema import ConfigError

    code = "from wgsef.rundir import run_id; print(run_id())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(ids)) == 2, ids
    assert claim(tmp_path / "a" / "run") == [tmp_path / "a" / "run", tmp_path / "a"]
    with pytest.raises(ConfigError, match="just created by another process"):
        claim(tmp_path / "a" / "run")


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
    (["resume=true", "seed=1"], "resume=true, but"),
    (["resume=true", "trainer.epochs=2"], "trainer.epochs: 1 -> 2"),
    (["resume=true", "method=wgsef"], "holds a different run ("),
], ids=["again", "other seed", "resume other seed", "resume other epochs", "resume other method"])
def test_refused_reuse_changes_nothing(finished, monkeypatch, capsys, args, message):
    before = snapshot(finished)
    code, err, _ = cli(monkeypatch, capsys, *tiny(finished.parents[1], "hydra.run.dir=runs/mine", *args))
    assert code == 2 and len(err) == 1 and message in err[0] and "nothing was changed" in err[0], err
    assert snapshot(finished) == before  # config.yaml, .hydra/overrides.yaml, checkpoint, summary, notes


def test_resume_of_the_same_run_is_accepted(finished, monkeypatch, capsys):
    code, err, out = cli(monkeypatch, capsys, *tiny(finished.parents[1], "hydra.run.dir=runs/mine", "resume=true",
                                                   "trainer.progress=false"))  # a volatile key may change
    assert code == 0, err
    assert json.loads((finished / "summary.json").read_text())["resumed"] is True


def test_overwrite_replaces_the_run_files_only(finished, monkeypatch, capsys):
    code, err, _ = cli(monkeypatch, capsys, *tiny(finished.parents[1], "hydra.run.dir=runs/mine", "overwrite=true",
                                                  "seed=7"))
    assert code == 0, err
    assert json.loads((finished / "summary.json").read_text())["seed"] == 7
    assert (finished / "my_notes.txt").read_text() == "mine"
    assert "seed=7" in (finished / ".hydra" / "overrides.yaml").read_text()


def test_overwrite_refuses_a_folder_that_holds_no_run(home, monkeypatch, capsys):
    before = snapshot(home)
    code, err, _ = cli(monkeypatch, capsys, *tiny(home, "hydra.run.dir=notes", "overwrite=true"))
    assert code == 2 and "holds no run" in err[0], err
    assert snapshot(home) == before


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
