"""The fit / evaluate loop, with atomic per-epoch checkpoints and exact resume.

A checkpoint holds everything the next epoch depends on: model, optimizer (prox/HSPG state included),
scheduler, regularizer state, every RNG (python, numpy, torch, CUDA, and the generator that shuffles the
training set), the epoch and the metrics so far. Resuming from it reproduces an uninterrupted run
exactly on CPU with the same seed.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wgsef.distributed import Dist, barrier, unwrap
from wgsef.errors import CheckpointError, Diverged, first_line
from wgsef.logging import epoch_line
from wgsef.regularizers.base import Regularizer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def finite_weights(model: nn.Module) -> bool:
    """Every parameter finite, and small enough that its squared norm is too (what a prox computes)."""
    return all(bool(torch.isfinite(p.detach().float().square().sum())) for p in model.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but no CUDA GPU is visible; use device=auto or device=cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got '{device}'")
    return torch.device(device)


def check_options(precision: str = "fp32", channels_last: bool = False, compile: bool | str = False) -> None:
    """The trainer's speed options, refused with one line naming the key."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(channels_last, bool):
        raise ValueError(f"trainer.channels_last must be true or false, got {channels_last!r}")
    if not isinstance(compile, (bool, str)) or compile == "":
        raise ValueError(f"trainer.compile must be true, false or a torch.compile backend name, got {compile!r}")


def prepare_model(model: nn.Module, channels_last: bool = False, compile: bool | str = False) -> nn.Module:
    """channels_last memory format (in place: the parameters stay the same objects), then torch.compile
    (`compile` true: the default inductor backend; a string: that backend). unwrap() gives back the model."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, **({} if compile is True else {"backend": compile}))
    return model


def autocast(device: torch.device, precision: str = "fp32"):
    """torch.autocast for `precision` (bf16) on `device`; a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """A batch on `device` (asynchronous from pinned memory), images in the model's memory format."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x), y


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = False) -> dict[str, float]:
    """Mean loss and accuracy over `loader`, summed on the device and read once."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, precision):
            out = model(x)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return {"loss": loss_sum.item() / max(n, 1), "acc": correct.item() / max(n, 1)}


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries in conv and linear weights, counted from the weights."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not ws:
        return 0.0
    return int(torch.stack([(w == 0).sum() for w in ws]).sum()) / sum(w.numel() for w in ws)


def all_finite(tensors) -> bool:
    """True when every entry of every tensor is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class FiniteLog:
    """Whether each step's loss was finite, written on the device without a host sync and read every
    `every` steps (and at the end of an epoch): one sync per `every` steps, the exact bad step when read."""

    def __init__(self, every: int, device: torch.device):
        self.flags = torch.ones(every, dtype=torch.bool, device=device)
        self.start = 0  # the step of flags[0]

    def record(self, step: int, loss: Tensor) -> None:
        self.flags[step - self.start] = torch.isfinite(loss.detach())

    def first_bad(self, upto: int) -> int | None:
        """The first step in [start, upto] whose loss was not finite, or None; starts a new window."""
        flags = self.flags[:upto - self.start + 1]
        bad = None if bool(flags.all()) else self.start + int((~flags).nonzero()[0])
        self.flags.fill_(True)
        self.start = upto + 1
        return bad


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # the epoch with the best validation accuracy
    wall_time: float = 0.0


def _rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill leaves the old file intact. Written
    through a Python file so that a full disk raises OSError(ENOSPC); on any error the temporary file goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Trainer:
    """Trains `model` for `epochs`; checkpoints to `run_dir/checkpoints/last.pt` after every epoch."""

    def __init__(self, model, loaders, optimizer, scheduler, regularizer: Regularizer, *, epochs: int,
                 device: torch.device, run_dir: str | Path, logger, generator: torch.Generator,
                 progress: bool = True, dist: Dist = Dist(), precision: str = "fp32", channels_last: bool = False,
                 check_every: int = 100):
        check_options(precision, channels_last)
        self.model, self.loaders, self.optimizer, self.scheduler = model, loaders, optimizer, scheduler
        self.regularizer, self.epochs, self.device, self.logger = regularizer, epochs, device, logger
        self.generator, self.progress, self.dist = generator, progress and dist.main, dist
        self.precision, self.channels_last, self.check_every = precision, channels_last, check_every
        self.ckpt = Path(run_dir) / "checkpoints" / "last.pt"
        self.state = TrainState()

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        if self.dist.main:
            atomic_save({
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "regularizer": self.regularizer.state_dict(), "rng": _rng_state(self.generator),
                "state": vars(self.state),
            }, self.ckpt)
        barrier(self.dist)

    def resume(self) -> bool:
        """Load the last checkpoint if there is one; False when starting fresh."""
        if not self.ckpt.exists():
            return False
        try:
            ck = torch.load(self.ckpt, map_location=self.device, weights_only=False)
            unwrap(self.model).load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.scheduler:
                self.scheduler.load_state_dict(ck["scheduler"])
            self.regularizer.load_state_dict(ck["regularizer"])
        except Exception as e:
            raise CheckpointError(f"cannot resume from {self.ckpt}: {type(e).__name__}: {first_line(e)}; "
                                  "delete it to start over, or point to the run directory it belongs to") from None
        _set_rng_state(ck["rng"], self.generator)
        self.state = TrainState(**ck["state"])
        self.logger.restore(self.state.history)
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch without host syncs in the step: loss and accuracy are summed on the device and read at
        the end; the loss's finiteness is read every `check_every` steps (Diverged names the exact step)."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n, finite = 0, FiniteLog(self.check_every, self.device)

        def check(step: int) -> None:
            bad = finite.first_bad(step)
            if bad is not None:
                raise Diverged(f"the training loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}")

        bar = tqdm(self.loaders.train, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress)
        step = -1
        for step, (x, y) in enumerate(bar):
            x, y = to_device(x, y, self.device, self.channels_last)
            try:
                with autocast(self.device, self.precision):
                    out = self.model(x)
                    loss = nn.functional.cross_entropy(out, y)
                extra = self.regularizer.loss()
                total = loss if extra is None else loss + extra
                finite.record(step, total)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                self.optimizer.step()
                self.regularizer.after_step(self.optimizer.param_groups[-1]["lr"])  # the weights' lr (last group)
            except Exception as e:
                check(step)  # a method that chokes on NaN inputs: report the divergence that caused it
                if isinstance(e, (ValueError, RuntimeError)) and not finite_weights(self.model):
                    # weights too large for their norms (a prox's input check): divergence, off the hot path
                    raise Diverged(f"{first_line(e)} at epoch {epoch + 1}, step {step + 1}") from e
                raise
            with torch.no_grad():
                loss_sum += loss.detach() * len(y)
                correct += (out.argmax(1) == y).sum()
            n += len(y)
            if step - finite.start + 1 == self.check_every:
                check(step)
                if self.progress:
                    bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}", acc=f"{correct.item() / n:.3f}")
        check(step)
        if not all_finite(self.model.parameters()):
            raise Diverged(f"a parameter became NaN or infinite during epoch {epoch + 1}")
        return {"train_loss": loss_sum.item() / max(n, 1), "train_acc": correct.item() / max(n, 1)}

    def start_epoch(self, epoch: int) -> None:
        """Tell the optimizer (HSPG's stage), the DDP sampler and the regularizer which epoch begins."""
        for stage in (self.optimizer, getattr(self.loaders.train, "sampler", None)):
            if hasattr(stage, "set_epoch"):
                stage.set_epoch(epoch)
        self.regularizer.on_epoch_start(epoch, self.epochs)

    def fit(self) -> TrainState:
        for epoch in range(self.state.epoch, self.epochs):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[-1]["lr"]  # the weights' lr (optim.param_groups puts them last)
            self.start_epoch(epoch)
            row = {"epoch": epoch + 1, **self._train_epoch(epoch)}
            if self.scheduler:
                self.scheduler.step()
            val, test = (evaluate(self.model, loader, self.device, self.precision, self.channels_last)
                         for loader in (self.loaders.val, self.loaders.test))
            row.update(val_loss=val["loss"], val_acc=val["acc"], test_acc=test["acc"], lr=lr,
                       weight_sparsity=weight_sparsity(self.model))
            row.update(self.regularizer.metrics())  # a method may report its own (effective) sparsity
            row["time_s"] = time.perf_counter() - t0
            self.state.epoch = epoch + 1
            self.state.wall_time += row["time_s"]
            self.state.history.append(row)
            if not self.state.best or row["val_acc"] > self.state.best["val_acc"]:
                self.state.best = {"epoch": epoch + 1, "val_acc": row["val_acc"], "test_acc": row["test_acc"]}
            self.logger.log(row)
            self.save()
            if self.dist.main:  # on stdout whatever it is (a SLURM or nohup log too), beside the bar
                print(epoch_line(row, self.epochs), flush=True)
        return self.state
