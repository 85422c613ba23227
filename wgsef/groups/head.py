"""Head groups: the attention heads of a transformer, one group per head.

An attention module is recognised by its layout (timm's and wgsef.models.vit's): a fused `qkv` Linear
whose 3*H*D outputs are q, k and v, each H heads of D channels, an output `proj` Linear reading the H*D
concatenated head outputs, and `num_heads`. Head h's group is its q, k and v rows of the qkv weight and
bias (the producer side, viewed as (3, H, D*E) with group axis 1); when they are zero the head's output
is exactly zero (softmax of zero scores averages zero values) and proj's columns on it are dead, so
compaction removes the head (wgsef.compress). The proj columns are consumers and stay out of the group.

FLOPs saved by a zero head: its share of the qkv and proj MACs (1/H of each); the attention products
q k^T and the weighted sum of v are not traced and not counted.
"""
from __future__ import annotations

import torch
from torch import nn

from wgsef.groups.base import GroupBlock, Member
from wgsef.groups.trace import LayerTrace


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "proj", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)]


def head_layout(att: nn.Module) -> tuple[int, int]:
    """(heads, head width) of an attention module, checked against its qkv and proj widths."""
    heads, out = att.num_heads, att.qkv.out_features
    if heads < 1 or out % (3 * heads) or att.proj.in_features != out // 3:
        raise ValueError(f"attention with {heads} heads needs qkv outputs 3*H*D and proj inputs H*D, "
                         f"got {out} and {att.proj.in_features}")
    return heads, out // (3 * heads)


def head_blocks(model: nn.Module, selected: dict[str, nn.Module], trace: LayerTrace | None) -> list[GroupBlock]:
    names = {m: n for n, m in model.named_modules()}
    taken = set(selected.values())
    blocks = []
    for att in attention_modules(model):
        if att.qkv not in taken:
            continue
        heads, width = head_layout(att)
        qkv = att.qkv
        members = [Member(qkv.weight, (3, heads, width * qkv.in_features), (1,))]
        members += [Member(qkv.bias, (3, heads, width), (1,))] if qkv.bias is not None else []
        flops = None if trace is None else torch.full(
            (heads,), (trace.macs.get(qkv, 0.0) + trace.macs.get(att.proj, 0.0)) / heads)
        blocks.append(GroupBlock(names[att], members, flops))
    return blocks
