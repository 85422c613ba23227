"""Every experiment (configs/experiment/, one per paper table) composes with each of its sweep values, and a
smoke version of it runs end to end on tiny files in the real dataset formats; every method preset
(configs/method/) trains on digits, and SSL from the dense run finds that run in the table layout."""
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.train import cli
from tests.conftest import CONFIGS
from tests.test_data import make_cifar, make_fashion, no_checksum  # noqa: F401 (no_checksum is a fixture)
from wgsef.run import register_resolvers, run

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
GROUPS = ("dataset", "model", "regularizer", "optimizer", "scheduler", "logger", "method")
# Smoke settings: one tiny epoch, a cheap measurement, no progress bars.
SMOKE = ["trainer.epochs=1", "trainer.progress=false", "measure.batches=[1]", "measure.min_run_time=0.01"]


def compose_with_hydra(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def sweep_params(experiment: str) -> dict[str, list]:
    """The experiment's hydra.sweeper.params as {key: [values, typed as Hydra parses them]} (may be empty:
    the sweep is then given on the command line)."""
    params = compose_with_hydra(f"experiment={experiment}").hydra.sweeper.params or {}
    parser = OverridesParser.create()
    out = {}
    for key, spec in params.items():
        override = parser.parse_overrides([f"{key}={spec}"])[0]
        out[key] = list(override.value().list) if override.is_sweep_override() else [override.value()]
    return out


def variants(experiment: str) -> list[dict]:
    """The first value of every sweep parameter, then each other value of one parameter at a time."""
    params = sweep_params(experiment)
    first = {k: v[0] for k, v in params.items()}
    return [first] + [{**first, k: v} for k, values in params.items() for v in values[1:]]


def as_overrides(choice: dict) -> list[str]:
    return [f"{k}={v}" for k, v in choice.items()]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    for choice in variants(experiment):
        cfg = compose_with_hydra(f"experiment={experiment}", *as_overrides(choice))
        for key, value in choice.items():
            got = cfg.hydra.runtime.choices[key] if key in GROUPS else OmegaConf.select(cfg, key)
            assert got == value, (experiment, key, got, value)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations, as in a real run
        # every interpolation of the job's config resolves (epoch_at, hydra:)
        job = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
               for k, v in cfg.items() if k != "hydra"}
        # re-runnable tables: a fixed directory per member (configs/hydra/table.yaml), killed members resume
        choices = cfg.hydra.runtime.choices
        assert job["name"] == experiment and job["resume"] is True and choices.hydra == "table"
        assert cfg.hydra.sweep.subdir.startswith(f"{choices.model}/{choices.method}/")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Tiny MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files in their real on-disk formats."""
    root = tmp_path_factory.mktemp("data")
    make_fashion(root, n_train=20, n_test=10)
    make_fashion(root, n_train=20, n_test=10, folder="MNIST")
    make_cifar(root, "cifar10", n=4)  # 5 training batches of 4 images
    make_cifar(root, "cifar100", n=20)
    return root


def smoke_cfg(make_cfg, data_root, *overrides):
    cfg = make_cfg(*overrides)
    extra = ["+dataset.limit=32"]  # images per split
    if cfg.dataset.name != "digits":
        extra += [f"dataset.root={data_root}", "dataset.download=false"]
    if "width" in cfg.model and cfg.model.name != "lenet5":
        extra.append("model.width=0.125")
    if "n_p" in cfg.optimizer:  # HSPG's half-space epoch inside the one-epoch smoke run (the schema checks it)
        extra.append("optimizer.n_p=0")
    if "milestones" in (cfg.get("scheduler") or {}):  # a recipe's lr milestones inside the run (the schema checks)
        extra.append("scheduler.milestones=[0]")
    return make_cfg(*overrides, *extra, *SMOKE)


def check_summary(summary: dict, run_dir: Path) -> None:
    assert summary["status"] == "completed" and summary["epochs"] == 1, summary
    assert 0 <= summary["test_acc"] <= 1 and summary["flops_reduction"] > 0, summary  # measured at the end
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / "metrics.csv").exists() and (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke(experiment, make_cfg, data_root, no_checksum, tmp_path):  # noqa: F811
    first = variants(experiment)[0]
    cfg = smoke_cfg(make_cfg, data_root, f"experiment={experiment}", *as_overrides(first))
    check_summary(run(cfg, tmp_path), tmp_path)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ssl_from_dense"])
def test_method_smoke(method, make_cfg, data_root, tmp_path):
    cfg = smoke_cfg(make_cfg, data_root, f"method={method}", "model=lenet5")
    check_summary(run(cfg, tmp_path), tmp_path)


def train(monkeypatch, *args):
    """`python -m experiments.train args`, in-process."""
    monkeypatch.setattr(sys, "argv", ["train", *args])
    cli()


TABLE_SMOKE = ["trainer.epochs=1", "trainer.progress=false", "measure.enabled=false", "+dataset.limit=128"]
NOT_IN_DIRNAME = ("hydra.job.config.override_dirname.exclude_keys=[model,method,hydra,name,paths.runs_dir,"
                  "trainer.epochs,trainer.progress,measure.enabled,dataset.limit]")


@pytest.mark.parametrize("extra", [[], ["trainer.batch_size=32"]], ids=["seed_only", "extra_override"])
def test_ssl_from_dense_in_table_layout(extra, monkeypatch, tmp_path):
    """method=dense, then method=ssl_from_dense with the same overrides: the SSL run starts from the
    dense run's last checkpoint, found through the table layout runs/<name>/<model>/dense/<overrides>."""
    common = ["hydra=table", "name=t", f"paths.runs_dir={tmp_path}", "seed=0", *TABLE_SMOKE, NOT_IN_DIRNAME, *extra]
    train(monkeypatch, "-m", "method=dense", *common)
    train(monkeypatch, "-m", "method=ssl_from_dense", *common)
    table = tmp_path / "t" / "lenet5"
    dense_dir, = (table / "dense").iterdir()
    ssl_dir, = (table / "ssl_from_dense").iterdir()
    summary = json.loads((ssl_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert summary["method"] == "ssl"
    init_from = OmegaConf.load(ssl_dir / "config.yaml").init_from
    assert Path(init_from) == dense_dir / "checkpoints" / "last.pt"
