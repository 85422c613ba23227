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
    assert {"train_loss", "train_acc", "val_acc", "test_acc", "lr", "time_s"} <= set(metrics.columns)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best_val"]["epoch"] == int(metrics.val_acc.idxmax()) + 1
    assert {"seed", "git_commit", "wall_time_s"} <= set(on_disk)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.pt").exists()


def _final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_resume_matches_uninterrupted(full_and_resumed, loader):
    full_dir, cut_dir = full_and_resumed(*FAST, "trainer.epochs=3", f"dataset.loader={loader}")
    full, cut = (pd.read_csv(d / "metrics.csv").drop(columns="time_s") for d in (full_dir, cut_dir))
    pd.testing.assert_frame_equal(full, cut)
    a, b = _final_state(full_dir), _final_state(cut_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the sync-free step and the speed options --------------------------------------------------------------
def _trainer(tmp_path, model, loaders, regularizer=None, **kwargs):
    from wgsef.logging import NullLogger
    from wgsef.regularizers.base import Regularizer

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, loaders, optimizer, None, regularizer or Regularizer(), epochs=1,
                   device=torch.device("cpu"), run_dir=tmp_path, logger=NullLogger(),
                   generator=torch.Generator().manual_seed(0), progress=False, **kwargs)


def _digits(batch_size=32, **kwargs):
    from wgsef.data import build_loaders

    return build_loaders("digits", batch_size=batch_size, image_size=16,
                         generator=torch.Generator().manual_seed(0), **kwargs)


def _lenet():
    from wgsef.models import build

    return build("lenet5", num_classes=10, in_channels=1, image_size=16)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_epoch_syncs_do_not_grow_with_steps(tmp_path, loader):
    """The host reads a fixed handful of values per epoch (loss, accuracy, the finiteness flags, the
    parameters' finiteness), however many steps: 34 steps cost what 9 do."""
    from wgsef.profiling import OpCounter

    syncs = {}
    for batch_size in (128, 32):
        trainer = _trainer(tmp_path, _lenet(), _digits(batch_size, loader=loader))
        with OpCounter() as counter:
            trainer._train_epoch(0)
        syncs[len(trainer.loaders.train)] = counter.syncs
    assert set(syncs) == {9, 34}
    # + 4 .item() on CPU generators with the DataLoader (its sampler's seeds): counted, though no device sync
    assert syncs[34] == syncs[9] <= (4 if loader == "device" else 8), syncs


class NaNAt:
    """A regularizer whose loss turns NaN from the `at`-th step on; with `raise_on_nan` its after_step
    fails on NaN parameters as a method validating its inputs would."""

    def __new__(cls, at, raise_on_nan=False):
        from wgsef.regularizers.base import Regularizer

        class _R(Regularizer):
            calls, model = 0, None

            def loss(self):
                self.calls += 1
                return torch.tensor(float("nan")) if self.calls >= at else None

            def after_step(self, lr):
                if raise_on_nan and any(not torch.isfinite(p).all() for p in self.model.parameters()):
                    raise ValueError("group norms must be finite")
        return _R()


@pytest.mark.parametrize("raise_on_nan", [False, True])
@pytest.mark.parametrize("check_every", [1, 4, 100])
def test_divergence_names_the_exact_step(tmp_path, check_every, raise_on_nan):
    from wgsef.train import Diverged

    reg = NaNAt(6, raise_on_nan)
    model = _lenet()
    reg.model = model
    trainer = _trainer(tmp_path, model, _digits(), reg, check_every=check_every)
    with pytest.raises(Diverged, match="at epoch 1, step 6$"):
        trainer._train_epoch(0)


def _one_step(model, x, y, precision="fp32", channels_last=False):
    from wgsef.train import autocast, to_device

    x, y = to_device(x, y, torch.device("cpu"), channels_last)
    with autocast(torch.device("cpu"), precision):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _pair():
    a = _lenet()
    b = _lenet()
    b.load_state_dict(a.state_dict())
    x, y = next(iter(_digits(64).train))
    return a, b, x, y


def test_bf16_autocast_runs_convs_in_bf16_and_matches_fp32():
    a, b, x, y = _pair()
    dtypes = []
    conv = next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ref_loss, ref_grads = _one_step(a, x, y)
    loss, grads = _one_step(b, x, y, precision="bf16")
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in b.parameters())  # master weights stay fp32
    assert abs(float(loss - ref_loss)) < 0.05 * float(ref_loss)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in ref_grads]), dim=0)
    assert cos > 0.99


def test_channels_last_same_result_and_same_parameters():
    from wgsef.train import prepare_model

    a, b, x, y = _pair()
    params = list(b.parameters())
    b = prepare_model(b, channels_last=True)
    assert [id(p) for p in b.parameters()] == [id(p) for p in params]  # the optimizer's parameters
    conv = next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    ref_loss, ref_grads = _one_step(a, x, y)
    loss, grads = _one_step(b, x, y, channels_last=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param(True, marks=pytest.mark.slow)])
def test_compile_same_result_and_unwraps(backend):
    from wgsef.distributed import unwrap
    from wgsef.train import prepare_model

    a, b, x, y = _pair()
    compiled = prepare_model(b, compile=backend)
    assert compiled is not b and unwrap(compiled) is b
    ref_loss, ref_grads = _one_step(a, x, y)
    loss, grads = _one_step(compiled, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", ["trainer.precision=bf16", "trainer.channels_last=true",
                                    "trainer.compile=aot_eager", "dataset.loader=dataloader"])
def test_options_train_end_to_end_and_resume(make_cfg, tmp_path, option):
    """Each option through run(): trains, checkpoints the plain model's weights, resumes."""
    cfg = make_cfg(*FAST, "trainer.epochs=2", "measure.enabled=false", option)
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["final"]["val_acc"] > 0.3, summary
    state = _final_state(tmp_path)
    assert not any(k.startswith(("_orig_mod", "module")) for k in state)
    summary = run(make_cfg(*FAST, "trainer.epochs=3", "measure.enabled=false", "resume=true", option), tmp_path)
    assert summary["resumed"] and summary["epochs"] == 3


@pytest.mark.parametrize("key,value,message", [("precision", "fp16", "trainer.precision must be one of fp32, bf16"),
                                               ("channels_last", "maybe", "trainer.channels_last must be true or false"),
                                               ("compile", "1.5", "trainer.compile must be true, false or")])
def test_bad_options_refused(key, value, message):
    from wgsef.train import check_options

    with pytest.raises(ValueError, match=message):
        check_options(**{"precision": "fp32", "channels_last": False, "compile": False,
                         key: {"1.5": 1.5}.get(value, value)})


def test_gpu_check_cpu_mode(tmp_path, monkeypatch):
    """`make gpu-check` at tiny sizes on the CPU: every section runs and reports; every method preset trains
    one epoch on synthetic CIFAR-format data; CUDA-only parts say they were skipped."""
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts" / "bench")
    monkeypatch.syspath_prepend(scripts)
    import gpu_check

    out = tmp_path / "gpu_check.md"
    code = gpu_check.main(["--cpu", "--out", str(out)])
    report = out.read_text()
    assert report.splitlines()[0] == f"python scripts/bench/gpu_check.py --cpu --out {out}"
    assert code == 0 and "6/6 sections ok" in report, report
    for method in gpu_check._presets():
        assert f"| {method} | completed |" in report
    for method in gpu_check.bench_step.METHODS:
        assert f"| vgg16 | fp32 | {method} |" in report
    assert "skipped: no CUDA GPU" in report and "latency_ms_cpu_b1_compact" in report
    removed = next(line for line in report.splitlines() if line.startswith("| removed_channels"))
    assert int(removed.split("|")[2]) > 0  # the WGSEF run was compacted for real
