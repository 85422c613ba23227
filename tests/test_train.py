"""The training pipeline end to end on digits: accuracy, run-directory contents, exact resume."""
import json

import pandas as pd
import pytest
import torch

from wgsef.run import run
from wgsef.train import Trainer

FAST = ("trainer.progress=false", "model=lenet5", "measure.repeats=1", "measure.min_run_time=0.05")


def test_digits_lenet_accuracy(make_cfg, tmp_path):
    summary = run(make_cfg(*FAST, "trainer.epochs=12"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["test_acc"] >= 0.90, summary
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.epoch) == list(range(1, 13))
    assert {"train_loss", "train_acc", "val_acc", "test_acc", "lr", "time"} <= set(metrics.columns)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best_val"]["epoch"] == int(metrics.val_acc.idxmax()) + 1
    assert {"seed", "git_commit", "wall_time_s"} <= set(on_disk)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.pt").exists()


def _final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_resume_matches_uninterrupted(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*FAST, "trainer.epochs=3")
    run(cfg, tmp_path / "full")

    save = Trainer.save

    def crash_after_first_epoch(self):
        save(self)
        if self.state.epoch == 1:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Trainer, "save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "save", save)
    summary = run(make_cfg(*FAST, "trainer.epochs=3", "resume=true"), tmp_path / "cut")
    assert summary["resumed"]

    full, cut = (pd.read_csv(tmp_path / d / "metrics.csv").drop(columns="time") for d in ("full", "cut"))
    pd.testing.assert_frame_equal(full, cut)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
