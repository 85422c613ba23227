"""The fit / evaluate loop, with atomic per-epoch checkpoints and exact resume.

A checkpoint holds everything the next epoch depends on: model, optimizer (prox/HSPG state included),
scheduler, regularizer state, every RNG (python, numpy, torch, CUDA, and the generator that shuffles the
training set), the epoch and the metrics so far. Resuming from it reproduces an uninterrupted run
exactly on CPU with the same seed.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wgsef.distributed import Dist, barrier, unwrap
from wgsef.penalties.base import Regularizer


class Diverged(RuntimeError):
    """The loss or a parameter became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit this run."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has no message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries in conv and linear weights, counted from the weights."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


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
    """torch.save to a temporary file in the same folder, then rename: a kill leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains `model` for `epochs`; checkpoints to `run_dir/checkpoints/last.pt` after every epoch."""

    def __init__(self, model, loaders, optimizer, scheduler, regularizer: Regularizer, *, epochs: int,
                 device: torch.device, run_dir: str | Path, logger, generator: torch.Generator,
                 progress: bool = True, dist: Dist = Dist()):
        self.model, self.loaders, self.optimizer, self.scheduler = model, loaders, optimizer, scheduler
        self.regularizer, self.epochs, self.device, self.logger = regularizer, epochs, device, logger
        self.generator, self.progress, self.dist = generator, progress and dist.main, dist
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
        self.model.train()
        loss_sum, correct, n = 0.0, 0, 0
        bar = tqdm(self.loaders.train, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            out = self.model(x)
            loss = nn.functional.cross_entropy(out, y)
            extra = self.regularizer.loss()
            total = loss if extra is None else loss + extra
            if not torch.isfinite(total):
                raise Diverged(f"the training loss became {total.item()} at epoch {epoch + 1}, step {step + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.regularizer.after_step(self.optimizer.param_groups[0]["lr"])
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
        if any(not torch.isfinite(p).all() for p in self.model.parameters()):
            raise Diverged(f"a parameter became NaN or infinite during epoch {epoch + 1}")
        return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}

    def fit(self) -> TrainState:
        for epoch in range(self.state.epoch, self.epochs):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            for stage in (self.optimizer, self.loaders.train.sampler):  # HSPG's stage, DDP's shard order
                if hasattr(stage, "set_epoch"):
                    stage.set_epoch(epoch)
            self.regularizer.on_epoch_start(epoch, self.epochs)
            row = {"epoch": epoch + 1, **self._train_epoch(epoch)}
            if self.scheduler:
                self.scheduler.step()
            val, test = evaluate(self.model, self.loaders.val, self.device), evaluate(self.model, self.loaders.test, self.device)
            row.update(val_loss=val["loss"], val_acc=val["acc"], test_acc=test["acc"], lr=lr,
                       weight_sparsity=weight_sparsity(self.model))
            row.update(self.regularizer.metrics())  # a method may report its own (effective) sparsity
            row["time"] = time.perf_counter() - t0
            self.state.epoch = epoch + 1
            self.state.wall_time += row["time"]
            self.state.history.append(row)
            if not self.state.best or row["val_acc"] > self.state.best["val_acc"]:
                self.state.best = {"epoch": epoch + 1, "val_acc": row["val_acc"], "test_acc": row["test_acc"]}
            self.logger.log(row)
            self.save()
        return self.state
