"""Per training step, for each method: time, operator calls and host syncs; and the CIFAR input pipeline.

    python scripts/bench/bench_step.py [--models vgg16 resnet18] [--methods dense wgsef_layer ...] [--batch 128]
        [--steps 12] [--width 1.0] [--precision fp32 bf16] [--device auto|cpu|cuda] [--threads 1]
        [--pipeline-samples 5120] [--out results/step_bench]

Every method is built from its preset (configs/method/) exactly as `experiments.train` builds it, on
random CIFAR-10-format images held on the device (`dataset.synthetic`, the device loader: crop, flip,
normalise per batch), and runs the Trainer's own epoch (`Trainer._train_epoch`): one warm-up epoch of
`--steps` steps, one timed, one counted under `wgsef.profiling.OpCounter`. The counted epoch is marked at
each batch: "per step" is the steady state between the second and the last batch (data pipeline, forward,
backward, optimizer step, prox); "per epoch" is what the epoch adds once (its start and end reads).
"amortised" is syncs per step over a CIFAR-10 epoch (45,000 images), with the finiteness read every
`check_every` steps: per_step + (per_epoch + (E - 1) // check_every) / E. On CUDA the timings are wall
clock after synchronising, and `torch.cuda.set_sync_debug_mode` counts the syncs CUDA itself sees.

The input pipeline is timed on one thread as CPU time per training sample over one epoch of
`--pipeline-samples` random CIFAR images: the device loader on the CPU, and the DataLoader path
(torchvision's per-sample PIL transforms) for comparison.

Writes <out>.csv and <out>.md, each starting with the command that produced it.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from wgsef.distributed import Dist
from wgsef.profiling import OpCounter
from wgsef.train import resolve_device

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = {  # name -> overrides of the training config
    "dense": ["method=dense"],
    "wgsef_layer": ["method=wgsef", "regularizer.scope=layer"],
    "wgsef_global": ["method=wgsef", "regularizer.scope=global"],
    "group_lasso": ["method=group_lasso"],
    "hspg_half_space": ["method=hspg", "optimizer.n_p=0"],  # half-space steps from the first epoch
    "ssl": ["method=ssl"],
    "srste": ["method=srste"],
    "gblr": ["method=gblr"],
}
CIFAR10_TRAIN = 45_000  # training images after the 10% validation split


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from wgsef.run import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def make_trainer(method: str, model: str, *, batch: int, steps: int, width: float, precision: str,
                 device: torch.device, run_dir: Path, extra: tuple[str, ...] = ()):
    """The Trainer `experiments.train` would build for `method`, on `steps` batches of random CIFAR-10
    images held on `device`."""
    from wgsef.run import build

    cfg = compose(*METHODS[method], f"model={model}", f"model.width={width}", "dataset=cifar10",
                  f"dataset.synthetic={batch * steps + 1}", "dataset.val_fraction=1e-9",  # one validation image
                  f"trainer.batch_size={batch}", f"trainer.precision={precision}", "trainer.epochs=10",
                  "trainer.progress=false", "measure.enabled=false", *extra)
    return build(cfg, run_dir, Dist(), device)


class _Marked:
    """The training loader, noting the counter's (ops, syncs) as each batch is handed out."""

    def __init__(self, loader, counter: OpCounter):
        self.loader, self.counter, self.marks = loader, counter, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.marks.append((self.counter.ops, self.counter.syncs))
            yield batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, clock: str) -> dict:
    """ms per step (timed epoch), ops and syncs per step (steady state) and per epoch (counted epoch)."""
    device, steps = trainer.device, len(trainer.loaders.train)
    if steps < 3:
        raise ValueError("--steps must be >= 3 (the steady state is measured between the second and last batch)")
    now = time.process_time if clock == "cpu" else time.perf_counter
    trainer.start_epoch(0)
    trainer._train_epoch(0)  # warm-up: allocations, caches, autotuning
    _sync(device)
    t0 = now()
    trainer.start_epoch(1)
    trainer._train_epoch(1)
    _sync(device)
    ms = (now() - t0) / steps * 1e3
    loader = trainer.loaders.train
    cuda_syncs = 0
    with OpCounter() as counter, warnings.catch_warnings(record=True) as caught:
        marked = trainer.loaders.train = _Marked(loader, counter)
        if device.type == "cuda":
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.start_epoch(2)
            trainer._train_epoch(2)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            trainer.loaders.train = loader
    if device.type == "cuda":
        cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    (ops_1, syncs_1), (ops_n, syncs_n) = marked.marks[1], marked.marks[-1]
    ops_step, syncs_step = (ops_n - ops_1) / (steps - 2), (syncs_n - syncs_1) / (steps - 2)
    epoch_len = -(-CIFAR10_TRAIN // loader.batch_size)
    syncs_epoch = counter.syncs - syncs_step * steps
    return {"check_every": trainer.check_every, "ms_per_step": ms, "ops_per_step": ops_step, "syncs_per_step": syncs_step,
            "syncs_per_epoch": syncs_epoch,
            "syncs_amortised": syncs_step + (syncs_epoch + (epoch_len - 1) // trainer.check_every) / epoch_len,
            "cuda_sync_warnings_per_epoch": cuda_syncs if device.type == "cuda" else "",
            "sync_ops": " ".join(f"{k}:{v}" for k, v in sorted(counter.sync_names.items()))}


def bench_steps(models, methods, precisions, *, batch: int, steps: int, width: float, device: torch.device,
                clock: str, log=print, deadline: float | None = None) -> list[dict]:
    """One row per model x precision x method; past `deadline` (time.perf_counter) the rest is left out."""
    rows = []
    for model in models:
        for precision in precisions:
            dense = None
            for method in methods:
                if deadline is not None and time.perf_counter() > deadline:
                    log(f"time is up: {model} {precision} {method} and the rest left out")
                    return rows
                with tempfile.TemporaryDirectory() as tmp:
                    trainer = make_trainer(method, model, batch=batch, steps=steps, width=width,
                                           precision=precision, device=device, run_dir=Path(tmp))
                    row = {"device": device_name(device), "model": model, "width": width, "batch": batch,
                           "precision": precision, "method": method, **measure(trainer, clock)}
                dense = row if method == "dense" else dense
                if dense is not None:
                    row["x_dense"] = row["ms_per_step"] / dense["ms_per_step"]
                    row["extra_ops"] = row["ops_per_step"] - dense["ops_per_step"]
                rows.append(row)
                log(f"{model} {precision} {method:16s} {row['ms_per_step']:9.2f} ms/step  "
                    f"{row['ops_per_step']:7.0f} ops/step  {row['syncs_per_step']:5.2f} syncs/step  "
                    f"{row['syncs_amortised']:5.2f} amortised")
    return rows


def bench_pipeline(samples: int, batch: int) -> list[dict]:
    """CPU time per training sample of one CIFAR epoch through each loader, on the current thread count."""
    from wgsef.data import build_loaders

    rows = []
    for loader in ("device", "dataloader"):
        loaders = build_loaders("cifar10", batch_size=batch, synthetic=samples + 1, val_fraction=1e-9,
                                loader=loader, device="cpu", generator=torch.Generator().manual_seed(0))
        for _ in loaders.train:  # warm-up
            break
        t0, n = time.process_time(), 0
        for _, y in loaders.train:
            n += len(y)
        rows.append({"loader": loader, "samples": n, "threads": torch.get_num_threads(),
                     "us_per_sample": (time.process_time() - t0) / n * 1e6})
    return rows


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def markdown(command: str, steps: list[dict], pipeline: list[dict]) -> str:
    first = steps[0] if steps else {}
    cols = ["model", "precision", "method", "ms_per_step", "x_dense", "ops_per_step", "extra_ops",
            "syncs_per_step", "syncs_per_epoch", "syncs_amortised"]
    lines = [command, "",
             f"Per training step on {first.get('device')} (batch {first.get('batch')}, width "
             f"{first.get('width')}). ops and syncs are counted by a TorchDispatchMode "
             f"(a sync: .item()/bool()/int(), nonzero, masked_select, unique, equal, a device-to-host copy, "
             f"tolist()); per step in the steady state, per epoch once; amortised over a CIFAR-10 epoch "
             f"with the finiteness read every {first.get('check_every')} steps.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in steps]
    if pipeline:
        lines += ["", "CIFAR input pipeline, CPU time per training sample (crop with padding 4, flip, normalise):",
                  "", "| loader | samples | threads | µs/sample |", "|---|---|---|---|"]
        lines += [f"| {r['loader']} | {r['samples']} | {r['threads']} | {r['us_per_sample']:.1f} |" for r in pipeline]
    return "\n".join(lines) + "\n"


def write(out: Path, command: str, steps: list[dict], pipeline: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in steps for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        f.write(f"# {command}\n")
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(steps)
        for r in pipeline:
            f.write(f"# pipeline {r['loader']}: {r['us_per_sample']:.2f} us/sample ({r['samples']} samples, "
                    f"{r['threads']} thread)\n")
    out.with_suffix(".md").write_text(markdown(command, steps, pipeline))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--width", type=float, default=1.0, help="model.width (channel multiplier)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: the thread's CPU time (default on CPU) | wall (always on CUDA)")
    p.add_argument("--pipeline-samples", type=int, default=5120, help="0: skip the input pipeline")
    p.add_argument("--out", type=Path, default=Path("results/step_bench"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    command = "python scripts/bench/bench_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clock = "wall" if device.type == "cuda" else args.clock or "cpu"
    steps = bench_steps(args.models, args.methods, args.precision, batch=args.batch, steps=args.steps,
                        width=args.width, device=device, clock=clock)
    pipeline = bench_pipeline(args.pipeline_samples, 128) if args.pipeline_samples else []
    for r in pipeline:
        print(f"input pipeline, {r['loader']}: {r['us_per_sample']:.1f} us/sample on {r['threads']} thread(s)")
    write(args.out, command, steps, pipeline)
    print(f"wrote {args.out}.csv and {args.out}.md")


if __name__ == "__main__":
    main()
