"""Ops and host syncs a group penalty adds to one training step (VGG16, CIFAR size), against dense.

    python scripts/bench_penalty_ops.py [--device cpu|cuda] [--batch 8] [--out results/penalty_ops]

One step is what the Trainer does: forward, loss (+ the regularizer's loss term), backward, optimizer
step, regularizer.after_step. Every aten op dispatched during steps 2..4 is counted by a TorchDispatchMode
(step 1 warms caches built on first use)
(`kernels` leaves out views, which launch nothing);
`syncs` counts the ops that make the host wait for the device (`.item()`/`int()`/`bool()` of a tensor, nonzero, boolean-mask indexing, copies to the CPU). On CUDA the
sync count also comes from torch.cuda.set_sync_debug_mode (the driver-level truth). The table gives
ops and syncs per step, and extra ops over the dense step, for: WGSEF (filter groups, layer and global
scope) with prox-SGD, group lasso with prox-SGD, SSL (filter + shape, the config's default) with SGD.
Writes <out>.md with the command as its first line.
"""
import argparse
import shlex
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wgsef.models import build
from wgsef.optim import sgd
from wgsef.optim.prox_sgd import prox_sgd
from wgsef.penalties.base import Regularizer
from wgsef.penalties.group_lasso import GroupLasso
from wgsef.penalties.ssl import SSL
from wgsef.penalties.wgsef import WGSEF

SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique_dim",
            "_unique2", "allclose"}
METHODS = {  # name -> (regularizer factory, optimizer factory)
    "dense": (Regularizer, sgd),
    "wgsef_layer": (lambda: WGSEF(lam=1e-3, k=0.5, scope="layer"), prox_sgd),
    "wgsef_global": (lambda: WGSEF(lam=1e-3, k=0.5, scope="global"), prox_sgd),
    "group_lasso": (lambda: GroupLasso(lam=1e-3), prox_sgd),
    "ssl": (lambda: SSL({"filter": 1e-4, "shape": 1e-4}), sgd),
}


class Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.views = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if func.is_view:
            self.views[name] += 1
        flat = [*args, *(kwargs or {}).values()]
        if (name in SYNC_OPS
                or name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for a in flat if isinstance(a, (list, tuple)) for i in a)
                or name in ("_to_copy", "copy_") and _to_host(func, args, kwargs)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    src = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    dst = args[0].device if func.overloadpacket.__name__ == "copy_" else (kwargs or {}).get("device")
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and \
        torch.device(dst).type == "cpu"


def count(method: str, device: str, batch: int, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = build("vgg16", num_classes=10, in_channels=3, image_size=32).to(device)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(10, (batch,), device=device)
    make_reg, make_opt = METHODS[method]
    reg = make_reg()
    model = reg.attach(model, x[:2])
    opt = make_opt(model, reg, lr=0.01)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        extra = reg.loss()
        total = loss if extra is None else loss + extra
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        reg.after_step(opt.param_groups[0]["lr"])

    step()  # first use: caches, lazy buffers
    driver_syncs = None
    with Counting() as c, warnings.catch_warnings(record=True) as caught:
        if device == "cuda":
            torch.cuda.synchronize()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            driver_syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
    return {"ops": sum(c.ops.values()) / steps, "kernels": sum((c.ops - c.views).values()) / steps,
            "syncs": sum(c.syncs.values()) / steps,
            "driver_syncs": driver_syncs, "top": (c.ops - Counter()).most_common(8),
            "sync_ops": dict(c.syncs)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="results/penalty_ops")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {m: count(m, args.device, args.batch) for m in ["dense", *[m for m in args.methods if m != "dense"]]}
    dense, dense_k = rows["dense"]["ops"], rows["dense"]["kernels"]
    cuda = args.device == "cuda"
    lines = ["| method | ops / step | extra ops vs dense (target <= 150) | extra non-view ops vs dense "
             "| host syncs / step (target <= 1)" + (" | CUDA syncs / step (sync debug mode) |" if cuda else " |"),
             "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['ops']:.0f} | {r['ops'] - dense:.0f} | {r['kernels'] - dense_k:.0f} | {r['syncs']:.1f}"
                     + (f" | {r['driver_syncs']:.1f} |" if cuda else " |"))
        print(f"{m:<13} ops {r['ops']:7.0f}  extra {r['ops'] - dense:6.0f} (non-view {r['kernels'] - dense_k:6.0f})  syncs {r['syncs']:5.1f}  "
              f"{r['sync_ops']}  top {r['top'][:5]}")
    header = f"python {shlex.join(['scripts/bench_penalty_ops.py', *argv])}  (device={args.device}, torch {torch.__version__})"
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!-- {header} -->\n\nPer training step of VGG16 (CIFAR-10 size, batch {args.batch}), "
                   "averaged over 3 steps after a warm-up step; filter groups, k = 0.5 per layer.\n\n"
                   + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
