"""Data-parallel training under torchrun on CPU (gloo, 2 processes): the ranks stay identical."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_gloo_ranks_identical(tmp_path):
    # HSPG: proximal steps in epoch 1, half-space steps from epoch 2 (n_p = 1), on both ranks
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "experiments.train",
         "method=hspg", "regularizer.lam=0.02", "regularizer.weights=sqrt_size", "optimizer.stage1=prox",
         "trainer.epochs=3", "optimizer.n_p=1", "optimizer.momentum=0.9", "optimizer.lr=0.05",
         "trainer.progress=false", "measure.enabled=false", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["ddp_max_param_spread"] == 0.0  # final weights identical on both ranks
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3]  # one writer: rank 0
    lines = r.stdout.strip().splitlines()  # one printer too: a start line, 3 epoch lines, the summary line
    assert [line.split(" ", 1)[0] for line in lines] == ["run", "epoch", "epoch", "epoch", "completed:"], lines
    assert lines[0].endswith("cpu x2; lam=0.02 scheme=filter")
    assert metrics.group_sparsity.iloc[-1] > 0  # the half-space stage zeroed groups, identically everywhere
