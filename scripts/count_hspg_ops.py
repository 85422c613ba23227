"""Operator calls and host syncs of one HSPG optimizer step against a dense SGD step, on VGG16 (CIFAR-10).

    python scripts/count_hspg_ops.py [--width 1.0] [--out results/hspg_ops]

Every aten operator the step dispatches is counted under a TorchDispatchMode; `aten._local_scalar_dense`
(behind .item(), bool(), int() of a tensor) is a host sync. Each optimizer takes one step first (buffers,
workspace and device tables are built then), and the second step is counted. The dense reference is
torch.optim.SGD (foreach) with the same momentum on the same model; "extra" is HSPG's count minus it.
The extra ops are split into those inside GroupSet's methods (norms, dots, scale_), inside the penalty
(grad_coeffs, prox_), and HSPG's own (wgsef/optim/hspg.py).
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
from torch.utils._python_dispatch import TorchDispatchMode

from wgsef.groups.base import GroupSet
from wgsef.models import build
from wgsef.optim import sgd
from wgsef.optim.hspg import hspg
from wgsef.penalties.base import Regularizer
from wgsef.penalties.group_lasso import GroupLasso
from wgsef.penalties.wgsef import WGSEF

SYNC = "aten._local_scalar_dense"
CASES = {  # name -> (penalty factory, hspg keyword arguments, epoch counted)
    "group lasso, half-space": (lambda: GroupLasso(1e-3, weights="ones"), {}, 1),
    "group lasso, subgradient stage": (lambda: GroupLasso(1e-3, weights="ones"), {}, 0),
    "WGSEF layer scope, k-aware half-space": (lambda: WGSEF(1e-3, k=0.5), {"stage1": "prox"}, 1),
    "WGSEF global scope, k-aware half-space": (lambda: WGSEF(1e-3, k=0.5, scope="global"), {"stage1": "prox"}, 1),
}


PARTS = [("groupset", GroupSet, ("norms", "dots", "scale_"))] + [
    ("penalty", cls, ("grad_coeffs", "prox_factors")) for cls in (GroupLasso, WGSEF)]


class OpCount(TorchDispatchMode):
    """Counts operator calls by the part of the code that issued them (the outermost wrapped method)."""

    def __init__(self):
        super().__init__()
        self.ops, self.part = Counter(), "own"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.part] += 1
        self.ops[SYNC] += str(func.overloadpacket) == SYNC
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.saved = [(cls, name, getattr(cls, name)) for part, cls, names in PARTS for name in names]
        for part, cls, names in PARTS:
            for name in names:
                setattr(cls, name, self._tagged(part, getattr(cls, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, name, fn in self.saved:
            setattr(cls, name, fn)
        return super().__exit__(*exc)

    def _tagged(self, part, fn):
        def wrapper(*args, **kwargs):
            outer, self.part = self.part, part if self.part == "own" else self.part
            try:
                return fn(*args, **kwargs)
            finally:
                self.part = outer
        return wrapper


def counted_step(model, make_optimizer) -> Counter:
    opt = make_optimizer(model)
    opt.step()  # first step: buffers, workspace, device tables
    with OpCount() as count:
        opt.step()
    return count.ops


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
        dense = counted_step(copy.deepcopy(base), lambda m: sgd(m, Regularizer(), lr=0.1, momentum=momentum,
                                                                 weight_decay=0.0))
        for name, (penalty, kwargs, epoch) in CASES.items():
            def make(model, penalty=penalty, kwargs=kwargs, epoch=epoch):
                reg = penalty()
                reg.attach(model, x)
                opt = hspg(model, reg, lr=0.1, n_p=1, momentum=momentum, **kwargs)
                opt.set_epoch(epoch)
                return opt
            ops = counted_step(copy.deepcopy(base), make)
            total = ops["own"] + ops["groupset"] + ops["penalty"]
            rows.append((name, momentum, total, dense["own"], total - dense["own"], ops["groupset"], ops["penalty"],
                         ops["own"] - dense["own"], ops[SYNC]))
    lines = [f"<!-- command: python {shlex.join(['scripts/count_hspg_ops.py', *(argv or sys.argv[1:])])} -->", "",
             f"Operator calls of one optimizer step on VGG16 (width {args.width}, CIFAR-10 shapes), CPU; "
             "dense = torch.optim.SGD with the same momentum.", "",
             "| HSPG step | momentum | ops | dense ops | extra ops | in GroupSet | in the penalty | HSPG's own extra "
             "| host syncs |", "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
