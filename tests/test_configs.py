"""Every option of every config group composes and instantiates."""
import pytest
import torch

from tests.conftest import CONFIGS
from wgsef.data import DatasetNotFound
from wgsef.run import instantiate

OPTIONS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml"))
           for g in ("dataset", "model", "regularizer", "optimizer", "scheduler", "logger")}
# optimizers that need a group penalty are tried with one
NEEDS_PENALTY = {"prox_sgd": "regularizer=group_lasso", "prox_adamw": "regularizer=group_lasso", "hspg": "regularizer=group_lasso"}


def small_model(cfg):
    kw = {} if cfg.model.name in ("lenet5", "torchvision") else {"width": 0.125}
    return instantiate(cfg.model, num_classes=10, in_channels=1, image_size=16, **kw)


@pytest.mark.parametrize("option", OPTIONS["model"])
def test_models(make_cfg, option):
    cfg = make_cfg(f"model={option}")
    assert small_model(cfg)(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("option", OPTIONS["dataset"])
def test_datasets(make_cfg, option, tmp_path):
    cfg = make_cfg(f"dataset={option}", f"paths.data_dir={tmp_path}")
    if option == "digits":
        assert instantiate(cfg.dataset, batch_size=8).spec.image_size == 16
    else:  # nothing on disk and no network here: the clear error
        with pytest.raises(DatasetNotFound, match=str(tmp_path)):
            instantiate(cfg.dataset, batch_size=8, download=False)


@pytest.mark.parametrize("option", OPTIONS["regularizer"])
def test_regularizers(make_cfg, option):
    cfg = make_cfg(f"regularizer={option}", "model=vgg16")
    reg = instantiate(cfg.regularizer)
    model = reg.attach(small_model(cfg), torch.zeros(2, 1, 16, 16))
    loss = model(torch.randn(2, 1, 16, 16)).sum() + (reg.loss() or 0)
    loss.backward()
    reg.after_step(0.01)
    assert all(isinstance(v, (int, float)) for v in reg.metrics().values())


@pytest.mark.parametrize("option", OPTIONS["optimizer"])
@pytest.mark.parametrize("scheduler", OPTIONS["scheduler"])
def test_optimizers_and_schedulers(make_cfg, option, scheduler):
    extra = [NEEDS_PENALTY[option]] if option in NEEDS_PENALTY else []
    cfg = make_cfg(f"optimizer={option}", f"scheduler={scheduler}", "model=lenet5", *extra)
    reg = instantiate(cfg.regularizer)
    model = reg.attach(small_model(cfg), torch.zeros(2, 1, 16, 16))
    opt = instantiate(cfg.optimizer)(model, reg)
    sched = instantiate(cfg.scheduler)(opt)
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] > 0


@pytest.mark.parametrize("option", OPTIONS["logger"])
def test_loggers(make_cfg, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(f"logger={option}")
    logger = instantiate(cfg.logger)(run_dir=tmp_path, config={"a": 1})
    logger.log({"epoch": 1, "val_acc": 0.5})
    logger.summary({"test_acc": 0.5})
    logger.finish()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,val_acc", "1,0.5"]
