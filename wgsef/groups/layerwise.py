"""Blocks of one layer each (every scheme but `filter`), with the FLOPs each group accounts for."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from wgsef.groups.base import GroupBlock, Member
from wgsef.groups.trace import LayerTrace

# a scheme's view of one layer: its members (the weight first), or None to leave the layer out
LayerView = Callable[[nn.Module], "list[Member] | None"]


def weight_view(module: nn.Module, shape: tuple[int, ...], group_axes: tuple[int, ...]) -> Member:
    return Member(module.weight, shape, group_axes)


def layerwise_blocks(selected: dict[str, nn.Module], trace: LayerTrace | None,
                     view: LayerView) -> tuple[list[GroupBlock], list[str]]:
    """One block per selected layer, and the names of the layers the view left out. A group's FLOPs are
    the layer's MACs times the share of the layer's weights in the group (zeroing the group removes
    exactly those multiply-accumulates)."""
    blocks, skipped = [], []
    for name, module in selected.items():
        members = view(module)
        if members is None:
            skipped.append(name)
            continue
        weight = members[0]
        flops = None if trace is None else torch.full(
            (weight.n_groups,), trace.macs[module] * weight.group_size / module.weight.numel())
        blocks.append(GroupBlock(name, members, flops))
    return blocks, skipped
