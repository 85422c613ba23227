"""Progress a user can follow in a log file: a start line and one line per epoch on stdout when stdout is not a
terminal (SLURM, nohup), each epoch's numbers those of metrics.csv."""
import re
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT
from wgsef.logging import epoch_line

EPOCH = re.compile(r"^epoch (\d+)/(\d+)  loss (\S+)  val acc (\S+)%  group sparsity (\S+)%  nonzero/k (\d+)/(\d+)"
                   r"  (\S+)s$")


def test_start_and_epoch_lines_in_a_redirected_log(tmp_path):
    args = ["method=wgsef", "regularizer.k=0.5", "trainer.epochs=2", "model=lenet5", "dataset.image_size=12",
            "+dataset.limit=128", "measure.enabled=false", f"hydra.run.dir={tmp_path}"]  # progress: auto
    r = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # stdout is a pipe, not a terminal
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[3].startswith("completed: "), lines
    assert lines[0].startswith(f"run {tmp_path}: wgsef on digits / lenet5, 2 epochs, batch 64, lr ")
    assert "; lam=0.001 k=0.5 scheme=filter scope=layer finish=top_k" in lines[0]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    for line, (_, row) in zip(lines[1:3], metrics.iterrows()):
        epoch, epochs, loss, acc, sparsity, nonzero, k, seconds = EPOCH.match(line).groups()
        assert (int(epoch), int(epochs)) == (row["epoch"], 2)
        assert float(loss) == round(row["train_loss"], 4) and float(acc) == round(100 * row["val_acc"], 2)
        assert float(sparsity) == round(100 * row["group_sparsity"], 1)
        assert (int(nonzero), int(k)) == (row["nonzero_groups"], row["k_groups"])
        assert float(seconds) == round(row["time_s"], 1)
    assert "epoch 1/2:" not in r.stderr  # no bar when stdout is not a terminal


def test_epoch_line_shows_only_what_the_method_logs():
    dense = {"epoch": 3, "train_loss": 0.123456, "val_acc": 0.9, "time_s": 12.34}
    assert epoch_line(dense, 10) == "epoch 3/10  loss 0.1235  val acc 90.00%  12.3s"
    gblr = {**dense, "mean_width": 0.4567, "penalty": 1.0}
    assert epoch_line(gblr, 10) == "epoch 3/10  loss 0.1235  val acc 90.00%  mean width 0.457  12.3s"
    lasso = {**dense, "group_sparsity": 0.25, "nonzero_groups": 30}  # no k: no nonzero/k
    assert epoch_line(lasso, 10) == "epoch 3/10  loss 0.1235  val acc 90.00%  group sparsity 25.0%  12.3s"
