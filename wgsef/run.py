"""One training run from a composed config: build, fit, finalize, measure, summarise.

This is the only library module that reads a config; it imports Hydra's `instantiate` lazily so the rest
of the package stays usable without Hydra.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from wgsef import distributed
from wgsef.distributed import Dist
from wgsef.logging import NullLogger
from wgsef.errors import Diverged, first_line
from wgsef.train import Trainer, finite_weights, prepare_model, resolve_device, seed_everything


def epoch_at(fraction: float, epochs: int) -> int:
    """Config resolver `${epoch_at:0.25,${trainer.epochs}}`: an epoch given as a fraction of the run; a
    fraction below 1 stays inside the run (at most the last epoch, numbered from 0)."""
    epoch = int(round(float(fraction) * int(epochs)))
    return min(epoch, max(int(epochs) - 1, 0)) if float(fraction) < 1 else epoch


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from wgsef.rundir import run_id

    OmegaConf.register_new_resolver("epoch_at", epoch_at, replace=True)
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)


def method_label(choices) -> str:
    """The method's name in summaries and tables, from Hydra's config-group choices (also read back from a
    run's .hydra/hydra.yaml by scripts/_runs.py): dense, wgsef, group_lasso, ssl, srste, gblr; with HSPG:
    hspg (group lasso, as OTO) or <regularizer>+hspg."""
    regularizer, optimizer = choices.get("regularizer"), choices.get("optimizer")
    if optimizer == "hspg":
        return "hspg" if regularizer == "group_lasso" else f"{regularizer}+hspg"
    return "dense" if regularizer == "none" else regularizer


def load_init(model, path: str, device) -> None:
    """Start from the weights of another run (its checkpoints/last.pt) or a bare state_dict file."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    except Exception as e:
        raise ValueError(f"init_from={path} cannot be loaded into {type(model).__name__}: "
                         f"{type(e).__name__}: {first_line(e)}") from None


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


KEY_SETTINGS = ("lam", "lams", "k", "n", "m", "scheme", "scope", "finish", "finish_epoch", "target_width", "ratio",
                "threshold")  # the regularizer's entries a start line shows (those it has)


def model_label(name: str, width=None) -> str:
    """The model with its channel multiplier when not 1: `vgg16 x0.25` (start lines, and the tables'
    model column through scripts/_runs.py)."""
    try:
        width = float(width)
    except (TypeError, ValueError):
        return name
    return name if width == 1 else f"{name} x{width:g}"


def start_line(cfg, run_dir: Path, method: str, device, world_size: int = 1) -> str:
    """The line a run prints on stdout before its first epoch: where it writes, what it trains, the key settings."""
    reg = {k: cfg.regularizer[k] for k in KEY_SETTINGS if cfg.regularizer.get(k) is not None}
    settings = " ".join(f"{k}={v}" for k, v in reg.items())
    model = model_label(cfg.model.name, cfg.model.get("width"))
    return (f"run {run_dir}: {cfg.get('label') or method} on {cfg.dataset.name} / {model}, "
            f"{cfg.trainer.epochs} epochs, batch {cfg.trainer.batch_size}, lr {cfg.optimizer.get('lr')}, "
            f"seed {cfg.seed}, {device}{f' x{world_size}' if world_size > 1 else ''}"
            + (f"; {settings}" if settings else ""))


def show_progress(setting) -> bool:
    """trainer.progress: true | false | auto (a tqdm bar only when stdout and stderr are terminals)."""
    return sys.stdout.isatty() and sys.stderr.isatty() if setting == "auto" else bool(setting)


def build(cfg, run_dir: Path, d: Dist, device: torch.device) -> Trainer:
    """Instantiate data, model, regularizer, optimizer, scheduler and logger; returns a ready Trainer."""
    from omegaconf import OmegaConf

    regularizer = instantiate(cfg.regularizer)  # cheap constructors first: bad values fail before any work
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loaders = instantiate(cfg.dataset, batch_size=cfg.trainer.batch_size, num_workers=cfg.trainer.num_workers,
                          generator=generator, distributed=(d.rank, d.world_size) if d.enabled else None, device=device)
    spec = loaders.spec
    model = instantiate(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size).to(device)
    if cfg.get("init_from"):
        load_init(model, cfg.init_from, device)
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, device=device)
    model = regularizer.attach(model, example).to(device)
    optimizer = instantiate(cfg.optimizer)(model, regularizer)
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    model = prepare_model(model, cfg.trainer.channels_last, cfg.trainer.compile)
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model)
    logger = (instantiate(cfg.logger)(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True))
              if d.main else NullLogger())
    return Trainer(model, loaders, optimizer, scheduler, regularizer, epochs=cfg.trainer.epochs, device=device,
                   run_dir=run_dir, logger=logger, generator=generator, progress=show_progress(cfg.trainer.progress), dist=d,
                   precision=cfg.trainer.precision, channels_last=cfg.trainer.channels_last)


def measure_run(model, cfg, spec, run_dir: Path) -> dict:
    """Compact the trained model, save it, and measure params, FLOPs and latency dense vs compact.

    Zeros that no channel removal can exploit (im2col columns, unstructured and N:M zeros) stay in the
    compact model and are listed under `flops_only`. Models made of a method's own inference layers
    (GBLR) are measured as they are: their efficient path is their compact form.
    """
    from wgsef.compress import compact, save_compact
    from wgsef.deploy import export_checked
    from wgsef.measure import measure_model, sparse_flops

    m = cfg.measure
    model = model.cpu().eval()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    example = torch.zeros(1, *shape)
    # the reference: the dense architecture as built (latency and FLOPs do not depend on the weights)
    dense = instantiate(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size).eval()
    out = {}
    try:
        small = compact(model, example, round_to=m.round_to)
    except Exception as e:  # a method's own layers that the dependency graph cannot prune through
        small, out["compaction"] = model, f"skipped ({type(e).__name__}: {first_line(e)})"
    else:
        report = small.compaction_report
        arch = {"name": cfg.model.name, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
                "image_size": spec.image_size, **{k: v for k, v in cfg.model.items() if k not in ("_target_", "name")}}
        save_compact(small, run_dir / "compact.pt", arch)
        write_json(report.widths(), run_dir / "compact.json")
        zero_cols = sum(z for z, _ in report.shape_zero_columns.values())
        out.update(compaction="done", removed_channels=report.removed_channels,
                   removed_heads=report.removed_heads,
                   zero_weights_left=report.zero_weights, zero_im2col_columns=zero_cols,
                   flops_only=[name for name, n in (("im2col columns", zero_cols),
                                                    ("unstructured/N:M zeros (no CPU speedup)",
                                                     report.zero_weights)) if n],
                   # what kernels that skip zero weights (2:4 sparse tensor cores, sparse CPU kernels) could
                   # at best save
                   flops_sparse=sparse_flops(small, example))
    if m.onnx:  # the deployed model, compacted or (when compaction was skipped) as trained
        out.update(export_checked(small, example, run_dir / "compact.onnx"))
    clock = "wall" if torch.cuda.is_available() else m.clock
    out.update(measure_model(dense, small, shape, batches=tuple(m.batches), threads=m.threads,
                             min_run_time=m.min_run_time, repeats=m.repeats, clock=clock, onnxruntime=m.onnx))
    if "flops_sparse" in out:
        out["flops_sparse_reduction"] = out["flops_dense"] / max(out["flops_sparse"], 1)
    return out


def run(cfg, run_dir: str | Path, method: str = "", prepare: Callable[[], None] | None = None) -> dict:
    """Train as `cfg` says inside `run_dir`; write and return summary.json's content.

    The config is checked first (wgsef.schema); nothing is written into run_dir until the model is built and
    a resume has loaded, then `prepare()` (the entry point's: .hydra/ files) and config.yaml. Under torchrun
    every rank calls this; rank 0's run directory is used by all, and only rank 0 writes.
    """
    from omegaconf import OmegaConf

    from wgsef.schema import validate

    validate(cfg)
    d, device = distributed.setup(resolve_device(cfg.trainer.device))
    own_dir, run_dir = Path(run_dir), Path(distributed.broadcast(str(run_dir), d))
    if not d.main and own_dir != run_dir:  # Hydra made one (empty) directory per process: remove it if still so
        try:
            own_dir.rmdir()
        except OSError:
            pass
    trainer = build(cfg, run_dir, d, device)
    resumed = bool(cfg.resume) and trainer.resume()
    if resumed and d.main:
        done = trainer.state.epoch
        print(f"resumed {run_dir} " + (f"at epoch {done + 1} of {cfg.trainer.epochs} (epochs 1-{done} from its "
                                        "checkpoint)" if done < cfg.trainer.epochs else
                                        f"after its last epoch ({done}): nothing left to train"), flush=True)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare()
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(start_line(cfg, run_dir, method, trainer.device, d.world_size), flush=True)
    status, error = "completed", None
    try:
        state = trainer.fit()
    except Diverged as e:
        status, error, state = "diverged", str(e), trainer.state
    except (ValueError, RuntimeError) as e:  # a check that met non-finite values (e.g. a prox's inputs)
        if finite_weights(trainer.model):
            raise
        status, error, state = "diverged", f"{first_line(e)} (epoch {trainer.state.epoch + 1})", trainer.state
    final = state.history[-1] if state.history else {}
    summary = {
        "status": status, "error": error, "method": cfg.get("label") or method, "seed": cfg.seed,
        "dataset": cfg.dataset.name, "model": cfg.model.name,
        "num_classes": trainer.loaders.spec.num_classes, "epochs": state.epoch, "resumed": resumed,
        "final": final, "best_val": state.best, "test_acc": final.get("test_acc"),
        "best_val_test_acc": state.best.get("test_acc"), "wall_time_s": state.wall_time,
        "git_commit": git_commit(), "device": str(trainer.device), "world_size": d.world_size,
    }
    if d.enabled:
        summary["ddp_max_param_spread"] = distributed.max_param_spread(trainer.model, d)
    if d.main:
        if status == "completed":
            model = trainer.regularizer.finalize(distributed.unwrap(trainer.model))
            if cfg.measure.enabled:
                summary.update(measure_run(model, cfg, trainer.loaders.spec, run_dir))
        write_json(summary, run_dir / "summary.json")
        trainer.logger.summary(summary)
        trainer.logger.finish()
    distributed.barrier(d)
    distributed.teardown(d)
    return summary
