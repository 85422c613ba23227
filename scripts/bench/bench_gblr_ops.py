"""Ops per training step of GBLR against dense (issue 14 item 4: GBLR within 3x of dense).

Counts every ATen op dispatched during one training step (forward, backward, optimizer step, GBLR's
after_step) and the host syncs among them with wgsef.profiling.OpCounter, after one warm-up step, for VGG16 and ResNet18 at width
0.25 on 16x16 one-channel inputs, batch 8 (op counts do not depend on sizes). Dense and GBLR use the
project's SGD factory; GBLR its default config (structural Adam, batched masks). Writes
results/gblr_step_ops.csv (first line: the command).

    python scripts/bench/bench_gblr_ops.py [--out results/gblr_step_ops.csv]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from wgsef.models import build
from wgsef.optim import sgd
from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.gblr import GBLR
from wgsef.profiling import OpCounter

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "regularizer" / "gblr.yaml"


def step_ops(model, regularizer, x, y) -> tuple[int, int]:
    opt = sgd(model, regularizer, lr=0.01)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        regularizer.after_step(opt.param_groups[-1]["lr"])

    step()
    with OpCounter() as counter:
        step()
    return counter.ops, counter.syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gblr_step_ops.csv"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONFIG)).items() if k != "_target_"}
    rows = []
    for name in ("vgg16", "resnet18"):
        def make():
            return build(name, num_classes=10, in_channels=1, image_size=16, width=0.25)
        dense, dense_syncs = step_ops(make(), Regularizer(), x, y)
        reg = GBLR(**options)
        gblr, gblr_syncs = step_ops(reg.attach(make(), x[:2]), reg, x, y)
        rows.append({"model": name, "gblr_layers": len(reg.layers), "dense_ops": dense, "gblr_ops": gblr,
                     "ratio": round(gblr / dense, 2), "dense_syncs": dense_syncs, "gblr_syncs": gblr_syncs})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        f.write(f"# python {' '.join(sys.argv)}  (torch {torch.__version__})\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
