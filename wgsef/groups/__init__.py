"""Turn a model into a GroupSet under one grouping scheme: `build_groups(model, scheme, example_input)`.

| scheme       | group of a conv W[O,I,kh,kw] / linear W[O,I]          | block       |
|--------------|-------------------------------------------------------|-------------|
| filter       | W[o] + bias[o] + BN gamma/beta[o], coupled over layers | coupled set |
| channel      | W[:, c]                                               | layer       |
| shape        | W[:, c, h, w] (an im2col column)                      | layer       |
| depth        | the whole layer (+ bias, BN), only under a shortcut   | layer       |
| unstructured | each weight                                           | layer       |
| block        | an r x c tile of the view O x (I*kh*kw)               | layer       |
| head         | an attention head: its q, k, v rows of a fused qkv    | attention   |
| mlp          | a hidden unit of Linear -> Linear (filter groups whose | coupled set |
|              | writers and readers are all Linear layers)            |             |
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
from wgsef.groups.head import head_blocks
from wgsef.groups.layerwise import layerwise_blocks
from wgsef.groups.shape import shape_view
from wgsef.groups.trace import LayerTrace, select_layers
from wgsef.groups.unstructured import unstructured_view

SCHEMES = ("filter", "channel", "shape", "depth", "unstructured", "block", "head", "mlp")
TRACED = ("filter", "depth", "head", "mlp")  # schemes that need a forward pass (couplings, shortcuts, FLOPs)


def _is_mlp(cs) -> bool:
    """A coupled set of hidden units: written and read only by Linear layers."""
    return bool(cs.readers) and not cs.heads and all(isinstance(m, nn.Linear) for m, _ in cs.writers + cs.readers)


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
    if scheme in ("filter", "mlp"):
        blocks = filter_blocks(model, example_input, selected, trace, _is_mlp if scheme == "mlp" else None, scheme)
    elif scheme == "head":
        blocks = head_blocks(model, selected, trace)
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
        hint = {"depth": " (depth groups need layers with a residual shortcut around them)",
                "head": " (head groups need attention modules with qkv and proj Linear layers and num_heads)",
                "mlp": " (mlp groups need Linear -> Linear hidden units)"}.get(scheme, "")
        raise ValueError(f"scheme '{scheme}' found no groups among the selected layers{hint}")
    return GroupSet(blocks, scheme=scheme)


__all__ = ["GroupBlock", "GroupSet", "Member", "SCHEMES", "build_groups"]
