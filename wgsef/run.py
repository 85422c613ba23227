"""One training run from a composed config: build, fit, finalize, measure, summarise.

This is the only library module that reads a config; it imports Hydra's `instantiate` lazily so the rest
of the package stays usable without Hydra.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from wgsef.train import Diverged, Trainer, resolve_device, seed_everything


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def instantiate(node, *args, **kwargs):
    """hydra.utils.instantiate, re-raising the error of the target itself (a clear ValueError from a
    constructor) rather than Hydra's wrapper around it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def check_trainer(t) -> None:
    for key in ("epochs", "batch_size"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ValueError(f"trainer.{key} must be an integer >= 1, got {t[key]!r}")
    if not isinstance(t.num_workers, int) or t.num_workers < 0:
        raise ValueError(f"trainer.num_workers must be an integer >= 0, got {t.num_workers!r}")


def build(cfg, run_dir: Path):
    """Instantiate data, model, regularizer, optimizer, scheduler and logger; returns a ready Trainer."""
    from omegaconf import OmegaConf

    check_trainer(cfg.trainer)
    device = resolve_device(cfg.trainer.device)
    regularizer = instantiate(cfg.regularizer)  # cheap constructors first: bad values fail before any work
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loaders = instantiate(cfg.dataset, batch_size=cfg.trainer.batch_size, num_workers=cfg.trainer.num_workers,
                          generator=generator)
    spec = loaders.spec
    model = instantiate(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size).to(device)
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, device=device)
    model = regularizer.attach(model, example).to(device)
    optimizer = instantiate(cfg.optimizer)(model, regularizer)
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    logger = instantiate(cfg.logger)(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True))
    return Trainer(model, loaders, optimizer, scheduler, regularizer, epochs=cfg.trainer.epochs, device=device,
                   run_dir=run_dir, logger=logger, generator=generator, progress=cfg.trainer.progress)


def measure_run(model, cfg, spec, run_dir: Path) -> dict:
    """Compact the trained model, save it, and measure params, FLOPs and latency dense vs compact.

    Zeros that no channel removal can exploit (im2col columns, unstructured and N:M zeros) stay in the
    compact model and are listed under `flops_only`. Models made of a method's own inference layers
    (GBLR) are measured as they are: their efficient path is their compact form.
    """
    from wgsef.compress import compact, save_compact
    from wgsef.measure import measure_model

    m = cfg.measure
    model = model.cpu().eval()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    out = {}
    try:
        small = compact(model, torch.zeros(1, *shape), round_to=m.round_to)
    except Exception as e:  # a method's own layers that the dependency graph cannot prune through
        small, out["compaction"] = model, f"skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    else:
        report = small.compaction_report
        arch = {"name": cfg.model.name, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
                "image_size": spec.image_size, **{k: v for k, v in cfg.model.items() if k not in ("_target_", "name")}}
        save_compact(small, run_dir / "compact.pt", arch)
        write_json(report.widths(), run_dir / "compact.json")
        zero_cols = sum(z for z, _ in report.shape_zero_columns.values())
        out.update(compaction="done", removed_channels=report.removed_channels,
                   zero_weights_left=report.zero_weights, zero_im2col_columns=zero_cols,
                   flops_only=[name for name, n in (("im2col columns", zero_cols),
                                                    ("unstructured/N:M zeros", report.zero_weights)) if n])
    clock = "wall" if torch.cuda.is_available() else m.clock
    out.update(measure_model(model, small, shape, batches=tuple(m.batches), threads=m.threads,
                             min_run_time=m.min_run_time, clock=clock))
    return out


def run(cfg, run_dir: str | Path, method: str = "") -> dict:
    """Train as `cfg` says inside `run_dir`; write and return summary.json's content."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build(cfg, run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    resumed = bool(cfg.resume) and trainer.resume()
    status, error = "completed", None
    try:
        state = trainer.fit()
    except Diverged as e:
        status, error, state = "diverged", str(e), trainer.state
    final = state.history[-1] if state.history else {}
    summary = {
        "status": status, "error": error, "method": cfg.get("label") or method, "seed": cfg.seed,
        "dataset": cfg.dataset.name, "model": cfg.model.name, "epochs": state.epoch, "resumed": resumed,
        "final": final, "best_val": state.best, "test_acc": final.get("test_acc"),
        "best_val_test_acc": state.best.get("test_acc"), "wall_time_s": state.wall_time,
        "git_commit": git_commit(), "device": str(trainer.device),
    }
    if status == "completed":
        trainer.model = trainer.regularizer.finalize(trainer.model)
        if cfg.measure.enabled:
            summary.update(measure_run(trainer.model, cfg, trainer.loaders.spec, run_dir))
    write_json(summary, run_dir / "summary.json")
    trainer.logger.summary(summary)
    trainer.logger.finish()
    return summary
