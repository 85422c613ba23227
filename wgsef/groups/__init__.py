"""Turn a model into a GroupSet under one grouping scheme: `build_groups(model, scheme, example_input)`.

| scheme       | group of a conv W[O,I,kh,kw] / linear W[O,I]          | block       |
|--------------|-------------------------------------------------------|-------------|
| filter       | W[o] + bias[o] + BN gamma/beta[o], coupled over layers | coupled set |
| channel      | W[:, c]                                               | layer       |
| shape        | W[:, c, h, w] (an im2col column)                      | layer       |
| depth        | the whole layer (+ bias, BN), only under a shortcut   | layer       |
| unstructured | each weight                                           | layer       |
| block        | an r x c tile of the view O x (I*kh*kw)               | layer       |
"""
from __future__ import annotations

import warnings
from functools import partial

from torch import Tensor, nn

from wgsef.groups.base import GroupBlock, GroupSet, Member
from wgsef.groups.block import block_view, parse_block
from wgsef.groups.channel import channel_view
from wgsef.groups.depth import depth_view
from wgsef.groups.filter import filter_blocks
from wgsef.groups.layerwise import layerwise_blocks
from wgsef.groups.shape import shape_view
from wgsef.groups.trace import LayerTrace, select_layers
from wgsef.groups.unstructured import unstructured_view

SCHEMES = ("filter", "channel", "shape", "depth", "unstructured", "block")
TRACED = ("filter", "depth")  # schemes that need a forward pass to find couplings or shortcuts


def build_groups(model: nn.Module, scheme: str, example_input: Tensor | None = None,
                 layers: list[str] | None = None, block: tuple[int, int] | None = None) -> GroupSet:
    """Groups of `model`'s conv/linear layers matching the `layers` globs (default: all but the final
    classifier). `example_input` (a batch on the model's device) is traced once to find couplings,
    shortcuts and per-group FLOPs; without it, per-layer schemes still work but carry no FLOPs."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown grouping scheme '{scheme}'; choose one of {', '.join(SCHEMES)}")
    if example_input is None and scheme in TRACED:
        raise ValueError(f"scheme '{scheme}' needs example_input to trace the model")
    trace = LayerTrace(model, example_input) if example_input is not None else None
    selected = select_layers(model, layers, trace)
    if scheme == "filter":
        blocks = filter_blocks(model, example_input, selected, trace)
    else:
        if scheme == "depth":
            view = depth_view(trace)
        elif scheme == "block":
            view = partial(block_view, block=parse_block(block))
        else:
            view = {"channel": channel_view, "shape": shape_view, "unstructured": unstructured_view}[scheme]
        blocks, skipped = layerwise_blocks(selected, trace, view)
        if scheme == "block" and skipped:
            warnings.warn(f"block groups: weights of {', '.join(skipped)} do not tile into {block} blocks; left out")
    if not blocks:
        hint = " (depth groups need layers with a residual shortcut around them)" if scheme == "depth" else ""
        raise ValueError(f"scheme '{scheme}' found no groups among the selected layers{hint}")
    return GroupSet(blocks, scheme=scheme)


__all__ = ["GroupBlock", "GroupSet", "Member", "SCHEMES", "build_groups"]
