"""Sweeps from the command line: the basic sweeper's grid, the joblib and SLURM launchers, and the Optuna
lambda search (configs/hparams_search/), all on tiny digits runs in-process through `experiments.train.cli`."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from experiments.train import objective
from tests.test_experiments import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_table  # noqa: E402

TINY = ["trainer.epochs=1", "trainer.progress=false", "measure.enabled=false", "+dataset.limit=256"]
LAMS, KS = ("0.0001", "0.01"), ("0.25", "0.5")


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(sweep_dir.iterdir()) if d.is_dir()}


def regularizer(run_dir: Path) -> tuple[str, str]:
    reg = yaml.safe_load((run_dir / "config.yaml").read_text())["regularizer"]
    return str(reg["lam"]), str(reg["k"])


def float_str(x: str) -> str:
    return str(float(x))


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns="time_s")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """method=wgsef, 2 lambdas x 2 ks with the basic sweeper and launcher (on one thread, as the joblib
    workers: joblib gives each of its 2 workers one of the 2 cores)."""
    sweep_dir = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        train(mp, "-m", "method=wgsef", f"regularizer.lam={','.join(LAMS)}", f"regularizer.k={','.join(KS)}",
              *TINY, f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir


def test_basic_sweep_grid_and_table(grid, tmp_path, capsys):
    runs = summaries(grid)
    assert list(runs) == ["0", "1", "2", "3"]
    assert all(s["status"] == "completed" and s["method"] == "wgsef" and s["epochs"] == 1 for s in runs.values())
    # Hydra's order: the last parameter varies fastest
    assert [regularizer(grid / n) for n in runs] == [(float_str(lam), k) for lam, k in itertools.product(LAMS, KS)]

    make_table.main([str(grid), "--name", "grid", "--out", str(tmp_path)])
    assert "4 runs, 0 not completed" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "grid.csv", comment="#")
    assert len(table) == 4 and set(table.method) == {"wgsef"} and (table.n_runs == 1).all()
    assert sorted(table.setting) == sorted(f"k={k}, lam={float_str(lam)}" for lam, k in itertools.product(LAMS, KS))


def test_joblib_launcher_runs_in_parallel_processes(grid, tmp_path, monkeypatch):
    """Two members in two worker processes; the `epoch_at` resolver travels with Hydra's singleton state,
    and each member ends with exactly the numbers of the same member run by the basic launcher."""
    train(monkeypatch, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=wgsef",
          f"regularizer.lam={','.join(LAMS)}", f"regularizer.k={KS[0]}", *TINY, f"hydra.sweep.dir={tmp_path}")
    launcher = OmegaConf.load(tmp_path / "multirun.yaml").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    runs = summaries(tmp_path)
    assert list(runs) == ["0", "1"] and all(s["status"] == "completed" for s in runs.values())
    for joblib_run, basic_run in (("0", "0"), ("1", "2")):  # lam 1e-4 / 1e-2 at k 0.25 in the 2x2 grid
        assert regularizer(tmp_path / joblib_run) == regularizer(grid / basic_run)
        pd.testing.assert_frame_equal(metrics(tmp_path / joblib_run), metrics(grid / basic_run))


def hydra_cfg(monkeypatch, capsys, *args) -> dict:
    train(monkeypatch, *args, "--cfg", "hydra")
    return yaml.safe_load(capsys.readouterr().out)["hydra"]


def test_slurm_launcher_composes(monkeypatch, capsys):
    """No SLURM here: `--cfg hydra` composes with the launcher, its values and overrides land, and the
    table experiments keep their run-directory layout (configs/hydra/table.yaml) under it."""
    h = hydra_cfg(monkeypatch, capsys, "experiment=table_cifar10", "hydra/launcher=slurm_gpu",
                  "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=90")
    launcher = h["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["timeout_min"]) == ("a100", 90)
    assert (launcher["gpus_per_node"], launcher["cpus_per_task"], launcher["mem_gb"],
            launcher["array_parallelism"]) == (1, 8, 32, 32)
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert h["sweep"]["dir"] == "${paths.runs_dir}/${name}" and h["job"]["chdir"] is False
    assert h["runtime"]["choices"]["hydra/launcher"] == "slurm_gpu" and h["runtime"]["choices"]["hydra"] == "table"
    # without an experiment the default run-directory layout (configs/hydra/default.yaml) stays as well
    h = hydra_cfg(monkeypatch, capsys, "hydra/launcher=slurm_gpu")
    assert h["sweep"]["subdir"] == "${hydra.job.num}" and h["launcher"]["partition"] == "gpu"


def test_slurm_launcher_writes_sbatch(monkeypatch, capsys, tmp_path):
    """The launcher's parameters are all ones submitit's SLURM executor accepts: the sbatch file it would
    submit carries them (srun's presence check and the submission itself are patched out)."""
    import submitit
    from hydra.utils import instantiate

    h = hydra_cfg(monkeypatch, capsys, "hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100")
    h["launcher"].update(submitit_folder=str(tmp_path / "%j"), name="train")  # Hydra resolves these at launch
    launcher = instantiate(h["launcher"])
    launcher.setup(hydra_context=None, task_function=None,
                   config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    sbatch = {}

    def capture(executor, fn, *iterables):
        sbatch["text"] = executor._executor._make_submission_file_text("python job.py", "0")
        raise KeyboardInterrupt  # stop before anything is submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([["seed=0"]], initial_job_idx=0)
    lines = sbatch["text"].splitlines()
    for expected in ("#SBATCH --partition=a100", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                     "#SBATCH --mem=32GB", "#SBATCH --time=720", "#SBATCH --signal=USR2@120"):
        assert expected in lines, (expected, lines)


def test_objective():
    spec = OmegaConf.create({"value": 1e-3, "reference": 0.9, "max_drop": 0.05})
    done = {"status": "completed", "final": {"val_acc": 0.86}}
    assert objective(spec, done) == 1e-3  # 0.86 >= 0.85: feasible, the value itself
    done["final"]["val_acc"] = 0.80
    assert objective(spec, done) == pytest.approx(-0.05)  # 0.05 short of 0.85
    assert objective(spec, {"status": "diverged", "final": {"val_acc": 0.95}}) == pytest.approx(-0.85)
    assert objective(spec, {"status": "completed", "final": {}}) == pytest.approx(-0.85)


def test_optuna_lambda_search(tmp_path, monkeypatch):
    """Two Optuna trials: lambda drawn log-uniformly in the configured range, each trial's value is
    objective() of its own run, and the best trial is reported in optimization_results.yaml."""
    studies = []  # the sweeper's in-memory study (storage: null)
    create_study = optuna.create_study
    monkeypatch.setattr(optuna, "create_study", lambda **kw: studies.append(create_study(**kw)) or studies[-1])
    sweep_dir = tmp_path / "sweep"
    reference = 0.2
    train(monkeypatch, "-m", "hparams_search=wgsef_lambda", "hydra.sweeper.n_trials=2",
          f"objective.reference={reference}", "objective.max_drop=0.05", *TINY, f"hydra.sweep.dir={sweep_dir}")
    trials = studies[0].trials
    assert studies[0].direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    runs = summaries(sweep_dir)
    assert list(runs) == ["0", "1"]
    for trial, (name, summary) in zip(trials, runs.items()):
        lam = trial.params["regularizer.lam"]
        assert 1e-5 <= lam <= 1e-1 and float(regularizer(sweep_dir / name)[0]) == lam
        acc = summary["final"]["val_acc"]
        assert trial.value == pytest.approx(lam if acc >= reference - 0.05 else acc - (reference - 0.05))
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(t.value for t in trials)


def test_optuna_sqlite_study_resumes(tmp_path, monkeypatch):
    """Persistent storage: a second invocation on the same sqlite study continues it (trial numbers go on,
    the first trial is still there) instead of starting a new one; its own sweep directory holds its run."""
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    common = ["hparams_search=wgsef_lambda", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}",
              "objective.reference=0.2", *TINY]
    train(monkeypatch, "-m", *common, f"hydra.sweep.dir={tmp_path / 'first'}")
    first = optuna.load_study(study_name="wgsef_lambda", storage=storage).trials
    train(monkeypatch, "-m", *common, "hydra.sweeper.sampler.seed=1", f"hydra.sweep.dir={tmp_path / 'second'}")
    trials = optuna.load_study(study_name="wgsef_lambda", storage=storage).trials
    assert [t.number for t in trials] == [0, 1] and [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params == first[0].params and trials[1].params != trials[0].params
    for sweep, trial in (("first", trials[0]), ("second", trials[1])):
        assert float(regularizer(tmp_path / sweep / "0")[0]) == trial.params["regularizer.lam"]
    result = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(t.value for t in trials)  # the best over both invocations


@pytest.mark.slow  # two fresh Python processes: about a minute on 2 busy cores
def test_optuna_sqlite_study_shared_by_parallel_workers(tmp_path):
    """Two processes at the same time on one sqlite study (each its own sampler seed and sweep directory):
    both trials land in the one study, under distinct trial numbers."""
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    optuna.create_study(study_name="wgsef_lambda", storage=storage, direction="maximize")  # no creation race
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "-m", "hparams_search=wgsef_lambda", "hydra.sweeper.n_trials=1",
         f"hydra.sweeper.storage={storage}", f"hydra.sweeper.sampler.seed={seed}", "objective.reference=0.2",
         *TINY, f"hydra.sweep.dir={tmp_path / str(seed)}"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    trials = optuna.load_study(study_name="wgsef_lambda", storage=storage).trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    lams = {float(regularizer(tmp_path / str(seed) / "0")[0]) for seed in (1, 2)}
    assert lams == {t.params["regularizer.lam"] for t in trials} and len(lams) == 2
