"""Runs that survive: bad configs rejected up front, SIGKILL at any moment resumes exactly, corrupt
checkpoints and divergence reported clearly, a failing sweep member spoils nothing."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.progress=false", "trainer.epochs=3", "model=lenet5", "measure.repeats=1", "measure.min_run_time=0.05"]


def train(*args, cwd=ROOT, driver: str | None = None):
    """`python -m experiments.train args`; with `driver`, that Python code runs first in the process
    (it patches a function to SIGKILL the process at a chosen moment)."""
    code = "import sys, runpy\n" + (driver or "") + "\nsys.argv = ['train', *sys.argv[1:]]\n" \
           "runpy.run_module('experiments.train', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


BAD = [
    (["model=alexnet"], "unknown model 'alexnet'; choose one of"),
    (["dataset=svhn"], "unknown dataset 'svhn'; choose one of"),
    (["dataset=mnist", "dataset.root=/nonexistent", "dataset.download=false"],
     "mnist not found in /nonexistent/MNIST/raw (dataset.download=false); run `make data`"),
    (["regularizer=l0"], "unknown regularizer 'l0'; choose one of"),
    (["optimizer=lion"], "unknown optimizer 'lion'; choose one of"),
    (["scheduler=linear"], "unknown scheduler 'linear'; choose one of"),
    (["logger=tensorboard"], "unknown logger 'tensorboard'; choose one of"),
    (["trainer.batch_size=0"], "trainer.batch_size must be an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs must be an integer >= 1"),
    (["trainer.num_workers=-1"], "trainer.num_workers must be an integer >= 0"),
    (["trainer.device=tpu"], "trainer.device must be one of auto, cpu, cuda"),
    (["trainer.device=cuda"], "no CUDA GPU is visible"),
    (["dataset=cifar10", "dataset.root=/nonexistent", "dataset.download=false"], "cifar10 not found in /nonexistent"),
    (["dataset=fashion_mnist", "dataset.root=/nonexistent", "dataset.download=false"], "fashion_mnist not found"),
    (["dataset.image_size=4"], "dataset.image_size=4 is too small for model lenet5: it needs images of at least 12x12"),
    (["model=nonsense,lenet5"], "unknown model 'nonsense'"),
    (["model=lenet5_caffe", "model.width=0.04"], "model.width must be a number >= 1/20"),  # its own base, not lenet5's
    (["method=gblr", "optimizer=hspg", "optimizer.n_p=1"], "optimizer hspg needs a group penalty regularizer"),
    (["method=srste", "optimizer=prox_sgd"], "optimizer prox_sgd needs a group penalty regularizer"),
    (["method=ssl", "model=vgg16", "model.width=0.125", "~regularizer.lams.shape", "+regularizer.lams.depth=1e-3"],
     "depth"),
    (["regularizer.lams.depth=1e-3", "method=ssl"], "unknown key regularizer.lams.depth; regularizer.lams has: "
                                                    "filter, shape; +regularizer.lams.depth=<value> adds it"),
    (["optimizer.momentum"], "Error parsing override 'optimizer.momentum'"),
    (["method=wgsef", "regularizer.k=0"], "k must be a group count"),
    (["method=wgsef", "regularizer.k=100000"], "k=100000 is larger than the number of filter groups"),
    (["method=wgsef", "regularizer.lam=-1"], "lam must be >= 0"),
    (["method=srste", "regularizer.n=4", "regularizer.m=4"], "1 <= n < m"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_rejected(tmp_path, args, message, monkeypatch, capsys):
    """In-process (the same code path as the command line, without a Python start-up per case)."""
    from experiments.train import cli

    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train", *FAST, *args, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not run_dir.exists()


KILLS = {  # where to SIGKILL the process, during epoch 2 of 3 (digits: 17 steps per epoch)
    "mid_epoch": "Regularizer.after_step", "checkpoint_write": "torch.save", "evaluation": "evaluate",
}
DRIVER = """
import os, signal, torch
import wgsef.train as T
from wgsef.regularizers.base import Regularizer
calls = {{"n": 0}}
def killer(original, at):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            if original is torch.save:  # leave a half-written temporary file behind
                args[1].write(b"partial")  # (atomic_save hands torch.save an open file)
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped
{patch}
"""
PATCHES = {
    "mid_epoch": "Regularizer.after_step = killer(Regularizer.after_step, 25)",
    "checkpoint_write": "T.torch.save = killer(torch.save, 2)",
    "evaluation": "T.evaluate = killer(T.evaluate, 3)",
}


def metrics(run_dir):
    return pd.read_csv(run_dir / "metrics.csv").drop(columns="time_s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    assert train(*FAST, f"hydra.run.dir={d}").returncode == 0
    return d


@pytest.mark.parametrize("moment", list(PATCHES))
def test_sigkill_then_resume_is_exact(tmp_path, uninterrupted, moment):
    r = train(*FAST, f"hydra.run.dir={tmp_path}", driver=DRIVER.format(patch=PATCHES[moment]))
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()
    r = train(*FAST, f"hydra.run.dir={tmp_path}", "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    pd.testing.assert_frame_equal(metrics(uninterrupted), metrics(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text())["resumed"]


def test_corrupt_checkpoint_reported(tmp_path, uninterrupted):
    shutil.copy(uninterrupted / "config.yaml", tmp_path)  # the same run, so resume=true tries its checkpoint
    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    r = train(*FAST, f"hydra.run.dir={tmp_path}", "resume=true")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot resume from {ckpt}" in lines[0]
    assert ckpt.read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_divergence_stops_with_status(tmp_path):
    # lr 1 is fine for epoch 1 on digits; a scheduler jump to 1e6 at epoch 2 makes the loss blow up
    r = train(*FAST, f"hydra.run.dir={tmp_path}", "optimizer.lr=0.05", "scheduler=step",
              "scheduler.milestones=[1]", "scheduler.gamma=1e8")
    assert r.returncode == 1
    assert "at epoch 2, step" in r.stderr and f"checkpoint is kept in {tmp_path / 'checkpoints' / 'last.pt'}" in r.stderr
    assert "No CUDA runtime" not in r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("diverged: ")  # after the start and epoch-1 lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1
    assert (tmp_path / "checkpoints" / "last.pt").exists()  # the last good epoch's checkpoint is kept
    assert len(metrics(tmp_path)) == 1


def test_failing_sweep_member_isolated(tmp_path):
    r = train("-m", *FAST, "trainer.epochs=1", "trainer.batch_size=64,0,32", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 1, r.stderr[-2000:]  # the sweep went on, then says which member failed
    assert "sweep member" in r.stderr and "trainer.batch_size=0 failed" in r.stderr
    assert "1 of 3 sweep members failed" in r.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob(".members-*"))  # the sweep's bookkeeping is gone
    status = {d.name: json.loads((d / "summary.json").read_text())["status"] for d in tmp_path.iterdir() if d.is_dir()}
    assert status == {"0": "completed", "1": "failed", "2": "completed"}
    assert "batch_size" in json.loads((tmp_path / "1" / "summary.json").read_text())["error"]
    r = subprocess.run([sys.executable, "scripts/make_table.py", str(tmp_path), "--name", "t", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "t.md").read_text()
    assert "failed" in table and "trainer.batch_size must be an integer >= 1" in table


SIGNAL = """
import os, signal
from wgsef.regularizers.base import Regularizer
after_step, calls = Regularizer.after_step, {{"n": 0}}
def signalled(self, *args):
    calls["n"] += 1
    if calls["n"] == 25:  # during epoch 2 of 3 (17 steps per epoch)
        os.kill(os.getpid(), signal.{sig})
    return after_step(self, *args)
Regularizer.after_step = signalled
"""


@pytest.mark.parametrize("sig,code,how", [("SIGINT", 130, "interrupted (Ctrl-C)"),
                                          ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_say_where_the_run_stopped(tmp_path, uninterrupted, sig, code, how):
    """One line: where the run stopped and the command that resumes it; that command, as printed, resumes it
    (the run's own overrides reloaded) to exactly the uninterrupted run."""
    r = train(*FAST, f"hydra.run.dir={tmp_path}", driver=SIGNAL.format(sig=sig))
    assert r.returncode == code, r.stderr[-2000:]
    command = f"python -m experiments.train resume=true hydra.run.dir={tmp_path}"
    assert r.stderr.strip().splitlines() == [f"{how}: the run stopped in epoch 2 of 3; checkpoints/last.pt holds "
                                             f"epochs 1-1; resume it with: {command}"]
    assert json.loads((tmp_path / ".wgsef-run").read_text())["state"] == "ended"  # the claim was released
    r = train(*command.split()[3:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"resumed {tmp_path} at epoch 2 of 3 (epochs 1-1 from its checkpoint)\n")
    pd.testing.assert_frame_equal(metrics(uninterrupted), metrics(tmp_path))


DISK_FULL = """
import builtins
import wgsef.train as T
calls = {"n": 0}
def full_at_second_checkpoint(path, mode="r", *args, **kwargs):
    if str(path).endswith("last.pt.tmp"):
        calls["n"] += 1
        if calls["n"] == 2:
            builtins.open(path, "wb").write(b"partial")  # the temporary file is partly written ...
            return builtins.open("/dev/full", mode)  # ... when the device is full (ENOSPC from the kernel)
    return builtins.open(path, mode, *args, **kwargs)
T.open = full_at_second_checkpoint
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to make a full device")
def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, uninterrupted):
    """The second checkpoint meets a full disk: one line that says so, the first checkpoint kept, the temporary
    file removed; with space again, the run resumes to exactly the uninterrupted one."""
    import torch

    r = train(*FAST, f"hydra.run.dir={tmp_path}", driver=DISK_FULL)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: disk full: no space left on the device of {tmp_path} "
                                                   "(the temporary files were removed, the last good checkpoint kept)")
    assert lines[0].endswith(f"checkpoints/last.pt holds epochs 1-1; free space, then resume it: python -m "
                             f"experiments.train resume=true hydra.run.dir={tmp_path}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["state"]["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    r = train("resume=true", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    pd.testing.assert_frame_equal(metrics(uninterrupted), metrics(tmp_path))
