"""CPU speed of a LeNet-5-Caffe MNIST epoch: the project's Trainer against a bare PyTorch loop, and each
method against dense.

    python scripts/bench/bench_cpu_epoch.py [--methods dense wgsef ...] [--batch 64] [--steps 150]
        [--repeats 3] [--threads 1] [--out results/cpu_epoch]

Every method is built from its preset (configs/method/) on `dataset=mnist model=lenet5_caffe` exactly as
`experiments.train` builds it (the device loader on the real MNIST of `make data`, or `--synthetic` random
images of that shape) and runs the Trainer's own epoch (`Trainer._train_epoch`), cut to its first `--steps`
batches. The bare loop is what one would write by hand: the same model class and initialisation, the
training images already normalised in one float tensor, a randperm per epoch, torch.optim.SGD with the same
lr, momentum and weight decay, and the same batch size and threads. Each is warmed up with one cut epoch,
then timed `--repeats` times in turn (bare, dense, every method, bare, ...) in the process's CPU time
(steady on a shared machine; one thread); the median is reported, as ms per step and as the projected
seconds per full epoch (54,000 training images). Targets: trainer / bare <= 1.15, method / dense <= 1.3.
Writes <out>.csv and <out>.md, each starting with the command that produced it.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wgsef.distributed import Dist

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = {  # name -> overrides of the training config (the table's methods at its kept fraction)
    "dense": ["method=dense"],
    "wgsef": ["method=wgsef", "regularizer.k=0.15"],
    "wgsef_cont": ["method=wgsef_cont", "regularizer.k=0.15"],
    "wgsef_hspg (half-space)": ["method=wgsef_hspg", "regularizer.k=0.15", "optimizer.n_p=0"],
    "magnitude": ["method=magnitude", "regularizer.k=0.15"],
    "gmp": ["method=gmp"],
    "group_lasso": ["method=group_lasso"],
    "hspg (half-space)": ["method=hspg", "optimizer.n_p=0"],
    "ssl": ["method=ssl", "~regularizer.lams.shape", "+regularizer.lams.channel=1e-4"],
    "srste": ["method=srste"],
    "gblr": ["method=gblr", "regularizer.lam=0.1", "regularizer.ratio=0.5", "regularizer.target_width=0.15",
             "regularizer.warmup_epochs=2"],  # the table's GBLR (MNIST_GBLR in the Makefile)
}
TRAIN_IMAGES = 54_000  # MNIST training images after the 10% validation split
TARGET_BARE, TARGET_METHOD = 1.15, 1.3


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from wgsef.run import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


class _First:
    """The first `n` batches of a loader (a new epoch each time it is iterated)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                break
            yield batch


def make_trainer(method: str, *, batch: int, steps: int, run_dir: Path, synthetic: int | None, data_dir: str):
    """The Trainer `experiments.train` builds for `method`, its training loader cut to `steps` batches."""
    from wgsef.run import build

    cfg = compose(*METHODS[method], "model=lenet5_caffe", "dataset=mnist", f"paths.data_dir={data_dir}",
                  f"dataset.synthetic={synthetic or 'null'}", f"trainer.batch_size={batch}", "trainer.epochs=10",
                  "trainer.progress=false", "trainer.device=cpu", "measure.enabled=false")
    trainer = build(cfg, run_dir, Dist(), torch.device("cpu"))
    trainer.loaders.train = _First(trainer.loaders.train, steps)
    return trainer, cfg


class BareLoop:
    """The hand-written baseline: same model and optimizer settings, images pre-normalised in memory."""

    def __init__(self, trainer, cfg, batch: int, steps: int):
        from wgsef.models import build

        torch.manual_seed(cfg.seed)
        loader = trainer.loaders.train.loader  # the DeviceLoader: its uint8 images and normalisation
        self.images = loader.images.float().mul_(loader.scale).add_(loader.shift)
        self.labels, self.batch, self.steps = loader.labels, batch, steps
        m = cfg.model
        self.model = build(m.name, 10, 1, 28, width=m.width, conv_relu=m.conv_relu)
        o = cfg.optimizer
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def epoch(self) -> None:
        self.model.train()
        perm = torch.randperm(len(self.labels), generator=self.generator)
        for s in range(self.steps):
            idx = perm[s * self.batch:(s + 1) * self.batch]
            loss = F.cross_entropy(self.model(self.images[idx]), self.labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def bench(methods, *, batch: int, steps: int, repeats: int, synthetic: int | None, data_dir: str,
          log=print) -> list[dict]:
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(methods):
            trainer, cfg = make_trainer(method, batch=batch, steps=steps, run_dir=Path(tmp) / str(i),
                                        synthetic=synthetic, data_dir=data_dir)

            def run(t=trainer):
                t.start_epoch(0)
                t._train_epoch(0)
            runners[method] = run
            if i == 0:
                runners = {"bare PyTorch loop": BareLoop(trainer, cfg, batch, steps).epoch, **runners}
        times = {name: [] for name in runners}
        for name, run in runners.items():  # warm-up: allocations, caches
            run()
        for r in range(repeats):
            for name, run in runners.items():
                t0 = time.process_time()
                run()
                times[name].append(time.process_time() - t0)
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    ms = {name: statistics.median(t) / steps * 1e3 for name, t in times.items()}
    bare, dense = ms["bare PyTorch loop"], ms.get("dense")
    rows = []
    for name, v in ms.items():
        ref = "" if name == "bare PyTorch loop" else (
            "bare" if name == "dense" else "dense")
        ratio = v / bare if ref == "bare" else v / dense if ref == "dense" and dense else None
        target = TARGET_BARE if ref == "bare" else TARGET_METHOD if ref == "dense" else None
        rows.append({"run": name, "ms_per_step": round(v, 3),
                     "s_per_epoch": round(v * -(-TRAIN_IMAGES // batch) / 1e3, 2),
                     "vs": ref, "ratio": "" if ratio is None else round(ratio, 3),
                     "target": target or "", "meets": "" if ratio is None else ratio <= target})
    return rows


def write(out: Path, command: str, rows: list[dict], note: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        f.write(f"# {command}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"<!-- {command} -->", "", note, "",
             "| run | ms / step | s / epoch | vs | ratio | target | meets |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['ms_per_step']:.2f} | {r['s_per_epoch']:.1f} | {r['vs']} | {r['ratio']} | "
              f"{r['target']} | {'' if r['meets'] == '' else 'yes' if r['meets'] else 'no'} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if (CONFIGS / "method" /
                   f"{METHODS[m][0].split('=')[1]}.yaml").exists()], choices=list(METHODS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="batches per timed epoch (of 844 at batch 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--synthetic", type=int, default=None, help="random images instead of the MNIST files")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="results/cpu_epoch")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    args.methods.sort(key=lambda m: m != "dense")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "scripts/bench/bench_cpu_epoch.py", *(sys.argv[1:] if argv is None else argv)])
    rows = bench(args.methods, batch=args.batch, steps=args.steps, repeats=args.repeats,
                 synthetic=args.synthetic, data_dir=args.data_dir)
    note = (f"LeNet-5-Caffe, MNIST, batch {args.batch}, {args.threads} thread(s), CPU time of the first {args.steps} "
            f"steps of an epoch (median of {args.repeats}, after a warm-up), torch {torch.__version__}; "
            f"targets: Trainer / bare loop <= {TARGET_BARE}, method / dense <= {TARGET_METHOD}.")
    write(Path(args.out), command, rows, note)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
