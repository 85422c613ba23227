"""Operator calls and host syncs of one HSPG optimizer step against a dense SGD step, on VGG16 (CIFAR-10).

    python scripts/bench/count_hspg_ops.py [--width 1.0] [--out results/hspg_ops]

Operator calls and host syncs are counted by `wgsef.profiling.OpCounter`. Each optimizer takes one step
first (buffers and device tables are built then), and the second step is counted. The dense
reference is torch.optim.SGD (foreach) with the same momentum on the same model; "extra" is HSPG's count
minus it, split into those inside GroupSet's methods (norms, dots, scale_, scaled), inside the penalty
(grad_coeffs, prox_factors), and HSPG's own (wgsef/optim/hspg.py).
Writes <out>.md, its first line the command that produced it.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch

from wgsef.groups.base import GroupSet
from wgsef.models import build
from wgsef.optim import sgd
from wgsef.optim.hspg import hspg
from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.group_lasso import GroupLasso
from wgsef.regularizers.wgsef import WGSEF
from wgsef.profiling import OpCounter

CASES = {  # name -> (penalty factory, hspg keyword arguments, epoch counted)
    "group lasso, half-space": (lambda: GroupLasso(1e-3, weights="ones"), {}, 1),
    "group lasso, subgradient stage": (lambda: GroupLasso(1e-3, weights="ones"), {}, 0),
    "WGSEF layer scope, k-aware half-space": (lambda: WGSEF(1e-3, k=0.5), {"stage1": "prox"}, 1),
    "WGSEF global scope, k-aware half-space": (lambda: WGSEF(1e-3, k=0.5, scope="global"), {"stage1": "prox"}, 1),
}
PARTS = [("groupset", GroupSet, ("norms", "dots", "scale_", "scaled"))] + [
    ("penalty", cls, ("grad_coeffs", "prox_factors")) for cls in (GroupLasso, WGSEF)]


class Parts:
    """While active, GroupSet's and the penalties' methods count their own operators (outermost call only)."""

    def __init__(self):
        self.ops, self.syncs, self.inside = Counter(), Counter(), False

    def __enter__(self):
        self.saved = [(cls, name, getattr(cls, name)) for _, cls, names in PARTS for name in names]
        for part, cls, names in PARTS:
            for name in names:
                setattr(cls, name, self._counted(part, getattr(cls, name)))
        return self

    def __exit__(self, *exc):
        for cls, name, fn in self.saved:
            setattr(cls, name, fn)

    def _counted(self, part, fn):
        def wrapper(*args, **kwargs):
            if self.inside:
                return fn(*args, **kwargs)
            self.inside = True
            try:
                with OpCounter() as c:
                    return fn(*args, **kwargs)
            finally:
                self.inside = False
                self.ops[part] += c.ops
                self.syncs[part] += c.syncs
        return wrapper


def counted_step(model, make_optimizer) -> tuple[OpCounter, Parts]:
    opt = make_optimizer(model)
    opt.step()  # first step: buffers, device tables
    with OpCounter() as total, Parts() as parts:
        opt.step()
    return total, parts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--out", default="results/hspg_ops")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = build("vgg16", num_classes=10, in_channels=3, image_size=32, width=args.width)
    x = torch.randn(2, 3, 32, 32)
    base(x).logsumexp(1).sum().backward()
    rows = []
    for momentum in (0.0, 0.9):
        dense, _ = counted_step(copy.deepcopy(base), lambda m: sgd(m, Regularizer(), lr=0.1, momentum=momentum,
                                                                    weight_decay=0.0))
        for name, (penalty, kwargs, epoch) in CASES.items():
            def make(model, penalty=penalty, kwargs=kwargs, epoch=epoch):
                reg = penalty()
                reg.attach(model, x)
                opt = hspg(model, reg, lr=0.1, n_p=1, momentum=momentum, **kwargs)
                opt.set_epoch(epoch)
                return opt
            total, parts = counted_step(copy.deepcopy(base), make)
            own = total.ops - parts.ops["groupset"] - parts.ops["penalty"] - dense.ops
            rows.append((name, momentum, total.ops, dense.ops, total.ops - dense.ops, parts.ops["groupset"],
                         parts.ops["penalty"], own, total.syncs, total.syncs - sum(parts.syncs.values())))
    lines = [f"<!-- command: python {shlex.join(['scripts/bench/count_hspg_ops.py', *(argv or sys.argv[1:])])} -->", "",
             f"Operator calls of one optimizer step on VGG16 (width {args.width}, CIFAR-10 shapes), CPU; "
             "dense = torch.optim.SGD with the same momentum.", "",
             "| HSPG step | momentum | ops | dense ops | extra ops | in GroupSet | in the penalty | HSPG's own extra "
             "| host syncs | HSPG's own syncs |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
