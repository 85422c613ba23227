"""Counting what a piece of code asks of the device: operator calls (each a kernel launch on a GPU) and
host-device synchronisations (each a stall of the CPU until the GPU has caught up).

`OpCounter` is a TorchDispatchMode: it sees every ATen operator call below autograd, on any device. A
sync is an operator whose result the host must read: `_local_scalar_dense` (behind `.item()`, `bool()`,
`int()`, `float()`), data-dependent shapes (`nonzero`, `masked_select`, `unique`...), `equal`, a copy from
an accelerator to the CPU, plus `Tensor.tolist()` (which reads memory without an operator). On CPU these
calls cost nothing but count the same, so the counts measured here are the ones a GPU would see.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal"}


def _op_name(func) -> str:
    return func.__name__.split(".")[0]


def _is_sync(func, name: str, args, kwargs, out) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # the output size is read from the repeats unless given
        return "Tensor" in func._overloadname and kwargs.get("output_size") is None
    return _device_to_host(name, args, kwargs, out)


def _device_to_host(name: str, args, kwargs, out) -> bool:
    if name not in ("_to_copy", "copy_"):
        return False
    src = args[1] if name == "copy_" else args[0]
    dst = out if name == "_to_copy" else args[0]
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
            and src.device.type not in ("cpu", "meta") and dst.device.type == "cpu")


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...` then c.ops (operator calls), c.syncs (host syncs), c.by_name."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter = Counter()
        self.sync_names: Counter = Counter()

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_names.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        self.by_name[name] += 1
        if _is_sync(func, name, args, kwargs, out):
            self.sync_names[name] += 1
        return out

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t, *args, **kwargs):
            counter.sync_names["tolist"] += 1
            return counter._tolist(t, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
